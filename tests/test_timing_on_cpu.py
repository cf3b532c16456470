"""``runtime.timing``: the actors' compute per method, and per phase for the iteration breakdown."""

import time

from dense_irl.runtime.timing import ComputeClock, phase_compute, timed


class _Actor(ComputeClock):
    @timed
    def generate(self, s: float) -> str:
        time.sleep(s)
        return "done"

    @timed
    def receive_weights(self, s: float) -> None:
        self.update_weights(s)  # a timed method inside another counts once, in the outer one

    @timed
    def update_weights(self, s: float) -> None:
        time.sleep(s)


def test_timed_methods_add_up_and_pop_resets():
    a = _Actor()
    assert a.generate(0.02) == "done" and a.generate(0.01) == "done"
    a.receive_weights(0.02)
    clock = a.pop_compute_s()
    assert set(clock) == {"generate", "receive_weights"}
    assert 0.03 <= clock["generate"] < 0.5 and 0.02 <= clock["receive_weights"] < 0.5
    assert a.pop_compute_s() == {}


def test_phase_compute_takes_the_slowest_actor_and_the_sync_in_series():
    senders = [{"policy_step": 2.0, "state_dict": 0.5}, {"policy_step": 3.0, "state_dict": 0.4}]
    receivers = [{"generate": 1.0, "update_weights": 0.2}, {"generate": 4.0, "update_weights": 0.3},
                 {"reward_step": 5.0, "score": 1.5, "update_pi_old": 0.1, "ping": 9.0}]
    got = phase_compute(senders, receivers)
    assert got == {"policy": 3.0, "sync": 0.5 + 0.3, "rollout": 4.0, "reward": 5.0, "score": 1.5}
