"""espo-rl: fused sampling kernels with ESPO early stopping for cheaper RL post-training of LLMs.

The package's layers, each a folder whose modules import only from the layers below it: ``espo.ops`` (the op and
its backends), ``espo.engine`` (the batched decoder), ``espo.tasks``, ``espo.rl`` (the trainer, the allocator,
the value head's fit, run folders), ``espo.integrations`` (transformers, TRL, vLLM, verl) and ``espo.app`` (the
command line, the demo, model conversion). The public names are below; ``MOVED_MODULES`` keeps the module paths of
espo 0.1's flat layout importable.
"""
import importlib
import importlib.abc
import importlib.util
import sys

from espo.engine.decoder import Decoder, Rollout, Rollouts, rollout_seed
from espo.engine.models import load_builtin, load_model
from espo.engine.tokenizer import CharTokenizer
from espo.engine.value_head import Critic, ValueHead
from espo.ops.backends import BackendInfo, backends
from espo.ops.sample import SampleOutput, sample
from espo.ops.sampling_params import SamplingParams
from espo.ops.stopper import CriticWarmup, EarlyStopper, ESPOConfig
from espo.rl.allocator import CeroAllocator
from espo.rl.trainer import TrainConfig, TrainResult, train
from espo.rl.value_fit import fit_value, load_value_head, save_value_head
from espo.tasks import ChainArithmetic, Problem, Task, TaskError, score
from espo.version import __version__ as __version__

# Module paths of espo 0.1's flat layout -> where each module lives now. ``import espo.stopper`` and
# ``from espo.config import TrainConfig`` keep working: the old name is bound to the new module itself.
MOVED_MODULES = {
    "espo.advantages": "espo.rl.advantages",
    "espo.allocator": "espo.rl.allocator",
    "espo.backends": "espo.ops.backends",
    "espo.checkpoint": "espo.rl.checkpoint",
    "espo.cli": "espo.app.cli",
    "espo.config": "espo.rl.config",
    "espo.decoder": "espo.engine.decoder",
    "espo.demo": "espo.app.demo",
    "espo.forward": "espo.engine.forward",
    "espo.kv_cache": "espo.engine.kv_cache",
    "espo.losses": "espo.rl.losses",
    "espo.model_fetch": "espo.app.model_fetch",
    "espo.model_runner": "espo.engine.model_runner",
    "espo.models": "espo.engine.models",
    "espo.philox": "espo.ops.philox",
    "espo.prompting": "espo.tasks.prompting",
    "espo.run_folder": "espo.rl.run_folder",
    "espo.sample_cuda": "espo.ops.cuda",
    "espo.sample_reference": "espo.ops.reference",
    "espo.sample_torch": "espo.ops.torch_backend",
    "espo.sampling": "espo.ops.sample",
    "espo.scheduler": "espo.engine.scheduler",
    "espo.slots": "espo.engine.slots",
    "espo.stopper": "espo.ops.stopper",
    "espo.tokenizer": "espo.engine.tokenizer",
    "espo.trainer": "espo.rl.trainer",
    "espo.update": "espo.rl.update",
    "espo.value_fit": "espo.rl.value_fit",
    "espo.value_head": "espo.engine.value_head",
    "espo.word_problems": "espo.tasks.word_problems",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as its new module (the same object, not a copy)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        # the import system returns sys.modules[name] after this call, so the new module is what the caller gets
        sys.modules[module.__name__] = importlib.import_module(MOVED_MODULES[module.__name__])


sys.meta_path.insert(0, _MovedModuleFinder())  # first: a stale espo/decoder.py left by an old build never wins
# An old path whose last name is also a public name (``espo.backends``, the function) is registered now: an import
# through the finder would bind the module over the public name (the import system sets it on its parent).
for _old, _new in MOVED_MODULES.items():
    if _old.rpartition(".")[2] in globals():
        sys.modules.setdefault(_old, importlib.import_module(_new))
del _old, _new

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
    "SamplingParams",
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
