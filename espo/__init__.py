"""espo-rl: fused sampling kernels with ESPO early stopping for cheaper RL post-training of LLMs."""
from .allocator import CeroAllocator
from .backends import BackendInfo, backends
from .decoder import Decoder, Rollout, Rollouts, rollout_seed
from .models import load_builtin, load_model
from .sampling import SampleOutput, sample
from .stopper import CriticWarmup, EarlyStopper, ESPOConfig
from .tasks import ChainArithmetic, Problem, Task, TaskError, score
from .tokenizer import CharTokenizer
from .trainer import TrainConfig, TrainResult, train
from .value_fit import fit_value, load_value_head, save_value_head
from .value_head import Critic, ValueHead

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "CeroAllocator",
    "ChainArithmetic",
    "CharTokenizer",
    "Critic",
    "CriticWarmup",
    "Decoder",
    "ESPOConfig",
    "EarlyStopper",
    "Problem",
    "Rollout",
    "Rollouts",
    "SampleOutput",
    "Task",
    "TaskError",
    "TrainConfig",
    "TrainResult",
    "ValueHead",
    "backends",
    "fit_value",
    "load_builtin",
    "load_model",
    "load_value_head",
    "rollout_seed",
    "sample",
    "save_value_head",
    "score",
    "train",
]
