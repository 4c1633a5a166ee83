"""The decoding thread count follows what is fastest now, on a simulated clock:
the tuner sees only the times it measures."""

import numpy as np

from llamazip.runtime import thread_tuner
from llamazip.runtime.thread_tuner import ThreadTuner


class FakeMachine:
    """Token times that depend on the thread count the tuner set, per phase."""

    def __init__(self, seconds_per_token: dict[int, float]):
        self.seconds_per_token = seconds_per_token
        self.now = 0.0
        self.threads = None
        self.counts: list[int] = []

    def set_threads(self, n: int) -> None:
        self.threads = n

    def clock(self) -> float:
        return self.now

    def decode_one(self) -> int:
        self.counts.append(self.threads)
        self.now += self.seconds_per_token[self.threads]
        return self.threads


def run(machine: FakeMachine, tuner: ThreadTuner, tokens: int) -> list[int]:
    return [tuner.run(machine.decode_one) for _ in range(tokens)]


def test_stays_on_all_cores_while_they_are_fastest():
    machine = FakeMachine({1: 0.040, 2: 0.025})
    tuner = ThreadTuner(2, machine.set_threads, machine.clock)
    used = run(machine, tuner, 1000)
    assert tuner.threads == 2
    # only the probes ran on one thread, less and less often: 32, 64, 128, 256, 256 tokens apart
    assert used.count(1) == 5 * thread_tuner.PROBE_TOKENS


def test_drops_a_thread_when_a_core_is_busy_and_climbs_back_when_it_frees():
    machine = FakeMachine({1: 0.040, 2: 0.080})  # one core busy: 2 threads collapse
    tuner = ThreadTuner(2, machine.set_threads, machine.clock)
    run(machine, tuner, thread_tuner.PROBE_EVERY + thread_tuner.PROBE_TOKENS)
    assert tuner.threads == 1
    used = run(machine, tuner, 1000)
    assert used.count(1) > 0.97 * len(used)
    machine.seconds_per_token = {1: 0.040, 2: 0.025}  # the other program ended
    run(machine, tuner, thread_tuner.PROBE_EVERY_MOST + thread_tuner.PROBE_TOKENS)
    assert tuner.threads == 2


def test_walks_down_several_cores_and_ignores_small_differences():
    machine = FakeMachine({1: 0.050, 2: 0.030, 3: 0.031, 4: 0.060})
    tuner = ThreadTuner(4, machine.set_threads, machine.clock)
    used = run(machine, tuner, 1000)
    assert tuner.threads in (2, 3)  # 2 and 3 differ by less than the tuner's 10%
    assert used[-100:].count(4) <= thread_tuner.PROBE_TOKENS


def test_one_core_never_probes():
    machine = FakeMachine({1: 0.040})
    tuner = ThreadTuner(1, machine.set_threads, machine.clock)
    assert set(run(machine, tuner, 100)) == {1}


def test_model_decodes_through_its_tuner(tmp_path):
    from llamazip.runtime.gguf import GGUFFile
    from llamazip.runtime.model import Model
    from tiny_models import TinyLlama

    model = Model(GGUFFile(TinyLlama(seed=2).write(tmp_path / "tiny.gguf")), n_ctx=16)
    expected = model.forward(np.array([5]), 0)
    seen = []
    model.thread_tuner = ThreadTuner(2, seen.append)
    np.testing.assert_array_equal(model.forward(np.array([5]), 0), expected)
    assert seen == [2, 2]  # set at start and for the token
