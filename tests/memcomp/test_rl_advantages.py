"""memcomp.rl.advantages: GRPO group advantages (unbiased std) and DAPO's dynamic sampling."""

import io
import math

import pytest
import torch

from memcomp.rl.advantages import DynamicSampler, DynamicSamplingError, group_advantages, token_advantages


def test_group_advantages_by_hand():
    # Group 1: rewards 1, 0, 0, 0 -> mean 0.25, unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5.
    # Group 2: rewards 1, 1, 0, 0 -> mean 0.5, var = 4 * 0.25 / 3 = 1/3, std 0.57735.
    # Group 3: all equal -> 0 everywhere (0 / (0 + eps)).
    adv = group_advantages([[1.0, 0, 0, 0], [1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5]])
    s2 = math.sqrt(1 / 3)
    expected = torch.tensor([[0.75 / (0.5 + 1e-6)] + [-0.25 / (0.5 + 1e-6)] * 3,
                             [0.5 / (s2 + 1e-6)] * 2 + [-0.5 / (s2 + 1e-6)] * 2,
                             [0.0] * 4])
    assert adv.dtype == torch.float32 and adv.shape == (3, 4)
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)
    # The biased std (correction 0) would give 0.75 / 0.4330 = 1.732 for group 1's first response, not 1.5.
    assert adv[0, 0].item() == pytest.approx(1.5, rel=1e-5)


def test_group_advantages_with_shaped_rewards_and_float64():
    r = torch.tensor([[1.0, 1.0 - 0.25, 0.0, -0.5]], dtype=torch.float64)
    adv = group_advantages(r)
    assert adv.dtype == torch.float64
    torch.testing.assert_close(adv, (r - r.mean()) / (r.std(unbiased=True) + 1e-6))


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 responses"):
        group_advantages([[1.0], [0.0]])
    with pytest.raises(ValueError, match="shape"):
        group_advantages([1.0, 0.0])
    with pytest.raises(ValueError, match="no groups"):
        group_advantages(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages([[1.0, float("nan")]])
    with pytest.raises(TypeError):
        group_advantages([[True, False]])
    with pytest.raises(TypeError):
        group_advantages([["a", "b"]])


def test_token_advantages_broadcast_over_response_tokens():
    adv = torch.tensor([[0.5, -0.5], [2.0, -2.0]])
    out = token_advantages(adv, [2, 1, 0, 3])
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5, -0.5, -2.0, -2.0, -2.0]))
    with pytest.raises(ValueError, match="4 advantages but 3 lengths"):
        token_advantages(adv, [1, 1, 1])
    with pytest.raises(ValueError, match="negative"):
        token_advantages(adv, [1, -1, 1, 1])


# ------------------------------------------------------------------------------------------------------------
# Dynamic sampling
# ------------------------------------------------------------------------------------------------------------

def _batch(start, correct):
    """A generation batch: groups named by prompt number, with their responses' correctness."""
    return [f"p{start + i}" for i in range(len(correct))], correct


def test_all_equal_groups_are_dropped_and_batches_refilled():
    s = DynamicSampler(batch_size=3, max_gen_batches=5, warmup_steps=0)
    assert s.next_batch() is None
    # 4 groups: two all-right / all-wrong (dropped), two mixed (kept)
    assert s.add(*_batch(0, [[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0]])) == 2
    assert s.next_batch() is None                                 # 2 < 3: generate more
    assert s.stats()["gen_batches"] == 1 and s.stats()["kept_fraction"] == 0.5
    assert s.add(*_batch(4, [[0, 0, 0], [1, 0, 1], [0, 1, 1]])) == 2
    st = s.stats()
    assert (st["gen_batches"], st["groups_generated"], st["groups_kept"]) == (2, 7, 4)
    assert s.next_batch() == ["p1", "p3", "p5"]                   # oldest first, exactly batch_size
    assert s.steps_done == 1 and s.num_buffered == 1              # p6 stays for the next step
    assert s.stats()["gen_batches"] == 0                          # a new step's counts
    assert s.add(*_batch(7, [[1, 0], [0, 1]])) == 2
    assert s.next_batch() == ["p6", "p7", "p8"]


def test_cap_reached_raises_naming_cap_and_kept_fraction():
    s = DynamicSampler(batch_size=4, max_gen_batches=3, warmup_steps=0)
    s.add(*_batch(0, [[1, 1], [0, 1], [0, 0], [1, 1]]))
    s.add(*_batch(4, [[0, 0], [0, 0], [1, 1], [1, 1]]))
    with pytest.raises(DynamicSamplingError, match=r"max_gen_batches=3.*kept 2 of 12 groups \(16.7%\)"):
        s.add(*_batch(8, [[1, 1], [1, 0], [0, 0], [0, 0]]))
    # A batch that fills on the cap-th generation batch is fine.
    s = DynamicSampler(batch_size=2, max_gen_batches=2, warmup_steps=0)
    s.add(*_batch(0, [[1, 1], [1, 0]]))
    s.add(*_batch(2, [[0, 1], [0, 0]]))
    assert s.next_batch() == ["p1", "p2"]


def test_warmup_keeps_everything_then_filtering_starts():
    s = DynamicSampler(batch_size=2, max_gen_batches=1, warmup_steps=2)
    for step in range(2):
        assert not s.filtering
        assert s.add(*_batch(2 * step, [[1, 1], [0, 0]])) == 2    # all-equal groups kept during warm-up
        assert s.next_batch() == [f"p{2 * step}", f"p{2 * step + 1}"]
    assert s.filtering and s.steps_done == 2
    with pytest.raises(DynamicSamplingError):
        s.add(*_batch(4, [[1, 1], [0, 0]]))                      # now they are dropped, and the cap is 1


def test_state_round_trip_resumes_the_same_stream():
    def run(s, batches):
        out = []
        for b in batches:
            s.add(*b)
            while (batch := s.next_batch()) is not None:
                out.append(batch)
        return out

    gen = [_batch(5 * k, [[k % 2, 1], [1, 1], [0, 1], [1, 0], [0, 0]]) for k in range(6)]
    full = run(DynamicSampler(batch_size=4, max_gen_batches=3, warmup_steps=1), gen)

    first = DynamicSampler(batch_size=4, max_gen_batches=3, warmup_steps=1)
    head = run(first, gen[:3])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)                           # what a checkpoint holds
    buf.seek(0)
    resumed = DynamicSampler(batch_size=4, max_gen_batches=3, warmup_steps=1)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    assert resumed.num_buffered == first.num_buffered > 0 and resumed.steps_done == first.steps_done
    assert head + run(resumed, gen[3:]) == full
    assert len(full) >= 3

    # A checkpoint between two generation batches of one step keeps that step's count towards the cap.
    mid = DynamicSampler(batch_size=4, max_gen_batches=2, warmup_steps=0)
    mid.add(*_batch(0, [[1, 0], [0, 0]]))
    again = DynamicSampler(batch_size=4, max_gen_batches=2, warmup_steps=0)
    again.load_state_dict(mid.state_dict())
    assert again.stats()["gen_batches"] == 1
    with pytest.raises(DynamicSamplingError, match="2 generation batches"):
        again.add(*_batch(2, [[1, 1], [0, 1]]))

    with pytest.raises(ValueError, match="batch_size"):
        DynamicSampler(batch_size=8).load_state_dict(first.state_dict())
    with pytest.raises(KeyError, match="buffer"):
        DynamicSampler(batch_size=4, warmup_steps=1).load_state_dict({"batch_size": 4, "warmup_steps": 1})


def test_dynamic_sampler_rejects_bad_input():
    for kwargs in ({"batch_size": 0}, {"batch_size": 2, "max_gen_batches": 0}, {"batch_size": 2, "warmup_steps": -1},
                   {"batch_size": 2.0}):
        with pytest.raises(ValueError):
            DynamicSampler(**kwargs)
    s = DynamicSampler(batch_size=2, warmup_steps=0)
    with pytest.raises(ValueError, match="2 groups but 1"):
        s.add(["a", "b"], [[1, 0]])
    with pytest.raises(ValueError, match="at least 2"):
        s.add(["a"], [[1]])
    with pytest.raises(ValueError, match="non-finite"):
        s.add(["a"], [[1, float("nan")]])
