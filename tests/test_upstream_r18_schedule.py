"""Record 18's schedules (embxlib.r18_schedule) against upstream's functions, transcribed from train_gpt_medium.py
at f411b3d3 (get_bs, get_ws, get_lr, get_muon_momentum, TrainingManager._build_mtp_schedule, split_step,
advance_schedule's YaRN condition, get_transition_steps), at every step 0..4740: equal bit for bit (the same float
expressions in the same order)."""
import math
from types import SimpleNamespace

from embxlib import r18_schedule as r18

# --- upstream, transcribed (its Hyperparameters, then its functions over `args`) ---------------------------------
args = SimpleNamespace(
    train_bs_schedule=(131072, 262144, 393216, 524288, 524288, 524288, 524288, 524288,
                       524288, 524288, 524288, 524288),
    train_bs_extension=32 * 2048 * 8, train_max_seq_len=128 * 16 * 2,
    num_scheduled_iterations=4700, num_extension_iterations=40, num_iterations=4700 + 40,
    cooldown_frac=0.70, split_embed_frac=2 / 3 / 4, block_size=128,
    ws_schedule=(3, 7, 11, 13, 15, 17, 19, 21, 23, 23, 23, 23), ws_final=23, ws_validate_post_yarn_ext=27)


def get_bs(step: int):
    if step >= args.num_scheduled_iterations:
        return args.train_bs_extension
    x = step / args.num_scheduled_iterations
    bs_idx = int(len(args.train_bs_schedule) * x)
    return args.train_bs_schedule[bs_idx]


def get_ws(step: int):
    if step >= args.num_scheduled_iterations:
        return args.ws_final // 2, args.ws_final
    x = step / args.num_scheduled_iterations
    assert 0 <= x < 1
    ws_idx = int(len(args.ws_schedule) * x)
    return min(11, args.ws_schedule[ws_idx] // 2), args.ws_schedule[ws_idx]


def get_lr(step: int):
    if step > args.num_scheduled_iterations:
        return 0.1
    lr_max = 1.0
    x = step / args.num_scheduled_iterations
    if x > 1/12:
        lr_max = 1.52  # (16/8)**0.6
    if x > 2/12:
        lr_max = 1.73  # (24/8)**0.5
    if x > 3/12:
        lr_max = 2.0
    if x >= 1 - args.cooldown_frac:
        w = (1 - x) / args.cooldown_frac
        lr = lr_max * w + (1 - w) * 0.1
        return lr
    return lr_max


def get_muon_momentum(step: int, muon_warmup_steps=300, muon_cooldown_steps=50, momentum_min=0.85, momentum_max=0.95):
    momentum_cd_start = args.num_iterations - muon_cooldown_steps
    if step < muon_warmup_steps:
        frac = step / muon_warmup_steps
        momentum = momentum_min + frac * (momentum_max - momentum_min)
    elif step > momentum_cd_start:
        frac = (step - momentum_cd_start) / muon_cooldown_steps
        momentum = momentum_max - frac * (momentum_max - momentum_min)
    else:
        momentum = momentum_max
    return momentum


def _build_mtp_schedule():
    mtp_weights_schedule = []
    for s in range(args.num_iterations + 1):
        x = s / (args.num_scheduled_iterations/4)
        if x < 1/3:
            w = [1.0, 0.5, 0.25 * (1 - 3*x)]
        elif x < 2/3:
            w = [1.0, 0.5 * (1 - (3*x - 1))]
        else:
            w = [1.0]
        mtp_weights_schedule.append(w)  # (upstream: torch.tensor(w) on the device, float32)
    return mtp_weights_schedule


def upstream_training_manager_run():
    """What TrainingManager does to the windows and YaRN over training: reset(), then advance_schedule(step) for
    step 0..num_iterations (the training loop's range(train_steps + 1)); Adam's active steps."""
    ws_short, ws_long = get_ws(0)  # reset
    yarn, active = [], []
    for step in range(args.num_iterations + 1):
        ws_short, new_ws_long = get_ws(step)
        if new_ws_long != ws_long and new_ws_long <= 13:
            yarn.append((step, ws_long, new_ws_long))  # self.model.yarn.apply(self.ws_long, new_ws_long)
        ws_long = new_ws_long
        active.append((True and step % 2 == 1) or not True)  # _is_active_step with odd_step_only
    return yarn, active


def get_transition_steps():
    transition_steps = [0]
    ws_short, ws_long = get_ws(0)
    for step in range(1, args.num_iterations):
        ws_short, new_ws_long = get_ws(step)
        if new_ws_long != ws_long:
            transition_steps.append(step)
            ws_long = new_ws_long
    return transition_steps


# --- tests ---------------------------------------------------------------------------------------------------------
STEPS = range(args.num_iterations + 1)  # 0..4740


def test_record_numbers():
    s = r18.RECORD18
    assert s.num_iterations == 4740 and s.train_max_seq_len == 4096 and s.ws_validate_post_yarn_ext == 27
    assert s.train_bs_extension == 524288


def test_batch_size_at_every_step():
    got = [r18.batch_tokens(i) for i in STEPS]
    assert got == [get_bs(i) for i in STEPS]
    assert sorted(set(got)) == [131072, 262144, 393216, 524288]
    # 4740 steps, about 2.18 B tokens (the number)
    assert 2.17e9 < sum(got[:4740]) < 2.19e9, sum(got[:4740])


def test_windows_at_every_step():
    got = [r18.windows(i) for i in STEPS]
    assert got == [get_ws(i) for i in STEPS]
    assert got[0] == (1, 3) and got[4739] == (11, 23) and got[4740] == (11, 23)
    assert {long for _, long in got} == {3, 7, 11, 13, 15, 17, 19, 21, 23}


def test_lr_multiplier_at_every_step():
    got = [r18.lr_multiplier(i) for i in STEPS]
    want = [get_lr(i) for i in STEPS]
    assert [x.hex() for x in map(float, got)] == [x.hex() for x in map(float, want)]  # bit for bit
    assert got[0] == 1.0 and got[4701] == 0.1 and max(got) == 2.0


def test_muon_momentum_at_every_step():
    got = [r18.muon_momentum(i) for i in STEPS]
    assert [x.hex() for x in got] == [x.hex() for x in map(float, (get_muon_momentum(i) for i in STEPS))]
    assert got[0] == 0.85 and got[300] == 0.95 and got[4740] == 0.85


def test_mtp_weights_at_every_step():
    want = _build_mtp_schedule()
    got = [r18.mtp_weights(i) for i in STEPS]
    assert [[w.hex() for w in ws] for ws in got] == [[w.hex() for w in ws] for ws in want]
    lengths = [len(w) for w in got]
    assert lengths.index(2) == 392 and lengths.index(1) == 784  # MTP over the first 784 steps


def test_split_step_yarn_and_odd_adam_steps():
    upstream_split = math.ceil(args.split_embed_frac * args.num_scheduled_iterations) | 1
    assert r18.split_step() == upstream_split == 785
    yarn, active = upstream_training_manager_run()
    assert r18.yarn_rescales() == yarn == [(392, 3, 7), (784, 7, 11), (1175, 11, 13)]
    assert [r18.adam_steps(i) for i in STEPS] == active
    assert r18.window_transitions() == get_transition_steps()


def test_a_narrowed_schedule_scales():
    s = r18.R18Schedule(num_scheduled_iterations=120, num_extension_iterations=4)
    assert s.num_iterations == 124
    assert [r18.batch_tokens(i, s) for i in (0, 10, 20, 30, 119, 120)] == [131072, 262144, 393216] + [524288] * 3
    assert r18.split_step(s) == 21 and r18.yarn_rescales(s)[0] == (10, 3, 7)
