"""espo-rl: fused sampling kernels with ESPO early stopping for cheaper RL post-training of LLMs."""
from .allocator import CeroAllocator
from .backends import BackendInfo, backends
from .sampling import SampleOutput, sample
from .stopper import EarlyStopper, ESPOConfig

__version__ = "0.1.0"

__all__ = ["BackendInfo", "CeroAllocator", "ESPOConfig", "EarlyStopper", "SampleOutput", "backends", "sample"]
