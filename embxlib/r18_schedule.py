"""Record 18's schedules (upstream train_gpt_medium.py at f411b3d3, 2025-12-31_BulkSmallTrackTransfer) as plain
functions of (step, R18Schedule): batch size, attention windows, learning-rate multiplier (its peak follows the
batch size), NorMuon momentum, the multi-token-prediction weights, YaRN's rescalings and the embed/head split.

Not wired into the trainer yet (issue 29): a later Config selects these by fields; R18Schedule holds the record's
numbers so that a narrowed run (fewer steps) can scale them. Every function reproduces upstream's float expressions
in upstream's order, so the values are equal bit for bit at every step (tests/test_upstream_r18_schedule.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class R18Schedule:
    num_scheduled_iterations: int = 4700  # lr and window schedules run over these
    num_extension_iterations: int = 40  # then this many steps at the final lr, batch and windows
    cooldown_frac: float = 0.70  # the last 70% of the scheduled steps decay the lr multiplier linearly ...
    lr_final: float = 0.1  # ... to this, which the extension keeps
    # the lr peak follows the batch size: (x threshold, peak) where x = step / num_scheduled_iterations > threshold
    lr_peaks: tuple = ((1 / 12, 1.52), (2 / 12, 1.73), (3 / 12, 2.0))
    # batch sizes in tokens (global), one entry per 1/len of the scheduled steps, then the extension's
    train_bs_schedule: tuple = (131072, 262144, 393216, 524288) + (524288,) * 8
    train_bs_extension: int = 32 * 2048 * 8
    train_max_seq_len: int = 128 * 16 * 2  # documents are cut at this many tokens (4096)
    # attention windows in blocks of block_size tokens: the long window per 1/len of the scheduled steps; the short
    # one is min(short_window_cap, long // 2); the extension uses ws_final // 2, ws_final; the last validation
    # extends the long window to ws_validate_post_yarn_ext (without a YaRN rescale)
    block_size: int = 128
    ws_schedule: tuple = (3, 7, 11, 13, 15, 17, 19, 21, 23, 23, 23, 23)
    short_window_cap: int = 11
    ws_final: int = 23
    ws_validate_post_yarn_ext: int = 27
    yarn_max_window: int = 13  # YaRN rescales RoPE on a long-window change only while the new window is <= this
    # NorMuon momentum: linear warm-up from min to max over the first steps, linear cooldown over the last ones
    muon_warmup_steps: int = 300
    muon_cooldown_steps: int = 50
    momentum_min: float = 0.85
    momentum_max: float = 0.95
    # multi-token prediction over the first num_scheduled_iterations / mtp_divisor steps:
    # [1, 0.5, 0.25 -> 0] for the first third, [1, 0.5 -> 0] for the second, then [1]
    mtp_divisor: int = 4
    split_embed_frac: float = 2 / 3 / 4  # the tied head becomes a separate embedding after this fraction (odd step)

    @property
    def num_iterations(self) -> int:
        return self.num_scheduled_iterations + self.num_extension_iterations


RECORD18 = R18Schedule()


def batch_tokens(step: int, s: R18Schedule = RECORD18) -> int:
    """Global batch in tokens at step (upstream get_bs)."""
    if step >= s.num_scheduled_iterations:
        return s.train_bs_extension
    x = step / s.num_scheduled_iterations
    return s.train_bs_schedule[int(len(s.train_bs_schedule) * x)]


def windows(step: int, s: R18Schedule = RECORD18) -> tuple[int, int]:
    """(short, long) attention windows in blocks at step (upstream get_ws)."""
    if step >= s.num_scheduled_iterations:
        return s.ws_final // 2, s.ws_final
    x = step / s.num_scheduled_iterations
    assert 0 <= x < 1
    long = s.ws_schedule[int(len(s.ws_schedule) * x)]
    return min(s.short_window_cap, long // 2), long


def lr_multiplier(step: int, s: R18Schedule = RECORD18) -> float:
    """The factor on every optimiser's initial lr at step (upstream get_lr): the peak for the current batch size,
    a linear cooldown over the last cooldown_frac of the scheduled steps to lr_final, lr_final after them."""
    if step > s.num_scheduled_iterations:
        return s.lr_final
    peak = 1.0
    x = step / s.num_scheduled_iterations
    for threshold, value in s.lr_peaks:
        if x > threshold:
            peak = value
    if x >= 1 - s.cooldown_frac:
        w = (1 - x) / s.cooldown_frac
        return peak * w + (1 - w) * s.lr_final
    return peak


def muon_momentum(step: int, s: R18Schedule = RECORD18) -> float:
    """NorMuon's momentum at step (upstream get_muon_momentum; the cooldown counts from num_iterations)."""
    cd_start = s.num_iterations - s.muon_cooldown_steps
    if step < s.muon_warmup_steps:
        frac = step / s.muon_warmup_steps
        return s.momentum_min + frac * (s.momentum_max - s.momentum_min)
    if step > cd_start:
        frac = (step - cd_start) / s.muon_cooldown_steps
        return s.momentum_max - frac * (s.momentum_max - s.momentum_min)
    return s.momentum_max


def mtp_weights(step: int, s: R18Schedule = RECORD18) -> list[float]:
    """The loss weights of predicting the next 1, 2, 3 tokens at step (upstream _build_mtp_schedule); the length
    is the number of predictions made."""
    x = step / (s.num_scheduled_iterations / s.mtp_divisor)
    if x < 1 / 3:
        return [1.0, 0.5, 0.25 * (1 - 3 * x)]
    if x < 2 / 3:
        return [1.0, 0.5 * (1 - (3 * x - 1))]
    return [1.0]


def split_step(s: R18Schedule = RECORD18) -> int:
    """The step after whose optimiser step the tied head's weight and Adam state are copied into the separate
    input embedding (an odd step, so that Adam has just stepped); from the next step on x0 reads the embedding."""
    return math.ceil(s.split_embed_frac * s.num_scheduled_iterations) | 1


def adam_steps(step: int) -> bool:
    """Whether the Adam optimisers step at step (odd steps only: their gradients accumulate over two steps)."""
    return step % 2 == 1


def yarn_rescales(s: R18Schedule = RECORD18) -> list[tuple[int, int, int]]:
    """(step, old long window, new long window) of every YaRN rescale of RoPE over training (upstream's
    advance_schedule from reset: a long-window change rescales only while the new window is <= yarn_max_window;
    after the first larger one YaRN stays as it is, and the final validation's window is not rescaled)."""
    out, long = [], windows(0, s)[1]
    for step in range(s.num_iterations + 1):
        new = windows(step, s)[1]
        if new != long and new <= s.yarn_max_window:
            out.append((step, long, new))
        long = new
    return out


def window_transitions(s: R18Schedule = RECORD18) -> list[int]:
    """Step 0 and every step where the long window changes (upstream get_transition_steps, used for warm-up)."""
    out, long = [0], windows(0, s)[1]
    for step in range(1, s.num_iterations):
        new = windows(step, s)[1]
        if new != long:
            out.append(step)
            long = new
    return out
