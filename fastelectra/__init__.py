"""fastelectra: fast ELECTRA pretraining on NVIDIA GPUs.

Triton fused attention and (residual-add +) layer norm, a C++/CUDA token-replacement op, a plain
torch ELECTRA that loads and saves HF checkpoints, and the pretraining / fine-tuning pipelines.
"""
__version__ = "0.1.0"

__all__ = ["patch", "unpatch", "__version__"]


def __getattr__(name):
    # patch / unpatch import torch: loaded on first use so `import fastelectra` stays cheap
    if name in ("patch", "unpatch"):
        from . import patching

        return getattr(patching, name)
    raise AttributeError(f"module 'fastelectra' has no attribute {name!r}")
