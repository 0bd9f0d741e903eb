"""CUDA graphs emulated on the CPU, for tests of the decoder's graphed paths (buckets, refill chunks) without a GPU."""
from espo.engine.model_runner import ModelRunner
from espo.engine.scheduler import Scheduler


class ReplayedForward:
    """A CUDA graph's stand-in on the CPU: ``replay`` reruns the captured forward and writes its results into the
    tensors that the capture returned, as a real replay overwrites its outputs; the forward must therefore read
    all it needs from static tensors (a refill chunk passed any other way would replay the first one)."""

    def __init__(self, forward):
        self.forward, self.outputs = forward, forward()

    def replay(self):
        for out, new in zip(self.outputs, self.forward()):
            if out is not None:
                out.copy_(new)


def graphs_on_cpu(monkeypatch, dec, **scheduler_kw):
    """``dec`` decoding as with CUDA graphs (buckets, refill chunks), each graph a ``ReplayedForward``."""
    def capture(self, forward):
        graph = ReplayedForward(forward)
        return graph, graph.outputs

    monkeypatch.setattr(ModelRunner, "_capture", capture)
    dec.cuda_graphs = True
    dec.scheduler = Scheduler(dec.runner, prefill_tokens=dec.prefill_tokens, **scheduler_kw)
    return dec


def spy_admissions(monkeypatch):
    """(live slots, admitted rollouts, prompt tokens counted per rollout, in a graphed step?) of each admission."""
    seen = []
    take = Scheduler._take_pending

    def spy(self, run, holes, chunk=None):
        live = self.slots.n_live
        plen = {r: int(run.plen[run.prompt_of[r]]) for r in run.pending}
        adm = take(self, run, holes, chunk)
        if adm is not None:
            seen.append((live, len(adm.rids), sum(plen[int(r)] for r in adm.rids), chunk is not None))
        return adm

    monkeypatch.setattr(Scheduler, "_take_pending", spy)
    return seen
