"""fastelectra: fast ELECTRA pretraining on NVIDIA GPUs.

Triton fused attention and (residual-add +) layer norm, a C++/CUDA token-replacement op, a plain
torch ELECTRA that loads and saves HF checkpoints, and the pretraining / fine-tuning pipelines.
"""
__version__ = "0.1.0"
