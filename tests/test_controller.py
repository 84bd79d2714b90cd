"""The LSTM policy (exact Plackett-Luce log-prob, entropy) and the weak-subnet search strategies."""

import io
import itertools
import math

import pytest
import torch

from advews.errors import AdvewsError
from advews.models import build_model
from advews.subnets import (
    Controller, ControllerSearch, L1Search, RandomSearch, Subnet, build_search, keep_count, space_of, subnet,
)
from advews.subnets.plackett_luce import authors_log_prob_and_entropy, log_prob_and_entropy, sample_ordered

# block 0: 3 paths (k=2) with 3, 2 and no channels; block 1: 2 paths (k=1); block 2: one path
# (certain) whose 1-channel layer is certain too.
TINY = (((3,), (2,), ()), ((4,), ()), ((1, 2),))
RHO = 0.5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on 2 cores shared with other jobs, 2 spinning OpenMP threads run ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _draws(n):
    k = keep_count(n, RHO)
    return [tuple(range(n))] if k == n else list(itertools.permutations(range(n), k))


def _all_ordered_outcomes(shape):
    """Every ordered draw the controller can make (certain decisions in index order)."""
    per_block = []
    for block in shape:
        options = []
        for kept in _draws(len(block)):
            layer_draws = [_draws(c) for p in kept for c in block[p]]
            for combo in itertools.product(*layer_draws):
                it = iter(combo)
                options.append((kept, tuple(tuple(next(it) for _ in block[p]) for p in kept)))
        per_block.append(options)
    return [Subnet(tuple(b[0] for b in combo), tuple(b[1] for b in combo)) for combo in itertools.product(*per_block)]


def _peaked_controller(shape, scale=8.0):
    """A controller with far-from-uniform decisions, so the checks below are not trivially met."""
    torch.manual_seed(0)
    ctrl = Controller(shape, RHO, hidden=16)
    with torch.no_grad():
        for p in ctrl.parameters():
            p.mul_(scale)
    return ctrl


def test_ordered_draw_probabilities_sum_to_one_and_entropy_is_exact():
    ctrl = _peaked_controller(TINY)
    outcomes = _all_ordered_outcomes(TINY)
    assert len(outcomes) == 40 * 13 * 2
    with torch.no_grad():
        log_prob, ent = ctrl.evaluate(outcomes)
    p = log_prob.double().exp()
    assert abs(p.sum().item() - 1) < 1e-5
    exact_entropy = -(p * log_prob.double()).sum()
    # chain rule: the per-draw estimate averages to the exact entropy of the ordered draw
    assert abs((p * ent.double()).sum() - exact_entropy).item() < 1e-4
    assert p.max() > 20 / len(outcomes)  # far from uniform


def test_sampled_frequencies_and_entropy_match():
    shape = TINY[:1]
    ctrl = _peaked_controller(shape, scale=4.0)
    outcomes = _all_ordered_outcomes(shape)
    n = 20000
    with torch.no_grad():
        probs = dict(zip(outcomes, ctrl.log_prob(outcomes).double().exp().tolist()))
        samples = ctrl.sample(n, torch.Generator().manual_seed(0))
        assert torch.allclose(ctrl.log_prob(samples.subnets[:50]), samples.log_prob[:50])
    counts = {o: 0 for o in outcomes}
    for s in samples.subnets:
        counts[s] += 1  # a sample outside the enumeration would raise KeyError
    z = [abs(counts[o] / n - q) / math.sqrt(q * (1 - q) / n) for o, q in probs.items()]
    assert max(z) < 5
    exact_entropy = -sum(q * math.log(q) for q in probs.values())
    ent = samples.entropy.double()
    assert abs(ent.mean().item() - exact_entropy) < 5 * ent.std().item() / math.sqrt(n) + 1e-6


def test_plackett_luce_matches_sequential_softmax_and_is_stable():
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.0, 0.7]], requires_grad=True)
    draw = torch.tensor([[2, 0, 4]])
    log_prob, ent = log_prob_and_entropy(logits, draw)
    remaining, want_lp, want_ent = list(range(5)), 0.0, 0.0
    for a in draw[0].tolist():
        lsm = torch.log_softmax(logits[0, remaining], 0)
        want_lp = want_lp + lsm[remaining.index(a)]
        want_ent = want_ent - (lsm.exp() * lsm).sum()
        remaining.remove(a)
    assert torch.allclose(log_prob, want_lp.reshape(1)) and torch.allclose(ent, want_ent.reshape(1))
    # the naive sum of per-item log-softmaxes is a different (wrong) number
    assert not torch.allclose(log_prob, torch.log_softmax(logits, 1)[0, draw[0]].sum().reshape(1))
    big = torch.tensor([[3e4, -3e4, 0.0, 1e4, -1e4, 5.0]], requires_grad=True)
    lp, h = log_prob_and_entropy(big, torch.tensor([[4, 1, 0]]))
    (lp + h).sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(h).all() and torch.isfinite(big.grad).all()


def _naive_log_prob_and_entropy(logits, draw):
    """Per step, a masked log-softmax over the items not drawn yet (float64, autograd all the way)."""
    k = draw.shape[-1]
    before = torch.zeros(*draw.shape, logits.shape[-1], dtype=torch.bool)  # (..., k, n): drawn before step i
    for i in range(1, k):
        before[..., i, :] = before[..., i - 1, :].scatter(-1, draw[..., i - 1:i], True)
    lsm = torch.log_softmax(logits.unsqueeze(-2).expand_as(before).masked_fill(before, float("-inf")), -1)
    log_prob = lsm.gather(-1, draw.unsqueeze(-1)).squeeze(-1).sum(-1)
    entropy = -(lsm.exp() * lsm.masked_fill(before, 0.0)).sum((-1, -2))
    return log_prob, entropy


def test_entropy_and_log_prob_gradients_match_naive_masked_softmax():
    """Every n in 2..64 and k in 1..n-1, logit scales 0.1 to 5: values and gradients to 1e-4."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0]).unsqueeze(1)
    worst = 0.0
    for n in range(2, 65):
        for k in range(1, n):
            logits = (torch.randn(5, n, generator=g) * scales).requires_grad_(True)
            draw = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(5)])
            lp, ent = log_prob_and_entropy(logits, draw)
            w = torch.randn(2, 5, generator=g)  # random cotangents: not only the gradient of the sum
            g_lp, g_ent = (torch.autograd.grad((w[i] * t).sum(), logits, retain_graph=True)[0]
                           for i, t in enumerate((lp, ent)))
            ref = logits.detach().double().requires_grad_(True)
            want_lp, want_ent = _naive_log_prob_and_entropy(ref, draw)
            r_lp, r_ent = (torch.autograd.grad((w[i].double() * t).sum(), ref, retain_graph=True)[0]
                           for i, t in enumerate((want_lp, want_ent)))
            assert torch.allclose(lp.double(), want_lp, rtol=1e-6, atol=1e-4), (n, k)
            assert torch.allclose(ent.double(), want_ent, rtol=1e-6, atol=1e-4), (n, k)
            worst = max(worst, (g_lp.double() - r_lp).abs().max().item(), (g_ent.double() - r_ent).abs().max().item())
    assert worst <= 1e-4, worst


def test_single_draw_entropy_is_categorical_entropy_with_its_gradient():
    g = torch.Generator().manual_seed(1)
    for n, scale in [(2, 0.1), (7, 1.0), (64, 5.0), (640, 3.0)]:
        logits = (torch.randn(8, n, generator=g) * scale).requires_grad_(True)
        draw = torch.randint(n, (8, 1), generator=g)
        _, ent = log_prob_and_entropy(logits, draw)
        (got,) = torch.autograd.grad(ent.sum(), logits)
        ref = logits.detach().clone().requires_grad_(True)
        want = torch.distributions.Categorical(logits=ref).entropy()
        (want_grad,) = torch.autograd.grad(want.sum(), ref)
        assert torch.allclose(ent, want, atol=1e-5)
        assert torch.allclose(got, want_grad, atol=1e-5), (got - want_grad).abs().max()


@pytest.mark.parametrize("rho, peaked, min_rise", [(0.7, False, 0.0), (0.5, True, 10.0)])
def test_entropy_bonus_spreads_the_policy_under_zero_advantage(space, rho, peaked, min_rise):
    """Constant rewards give zero advantage: only the entropy bonus moves the policy, and it must
    raise the entropy. With the old clamped gradient it fell from the near-uniform start (82.47 ->
    80.30 nats at rho 0.7) and rose by only 4.6 of the 15.5 nats from a peaked start (rho 0.5)."""
    search = ControllerSearch(space, rho, lr=3e-3, entropy_weight=0.01, seed=2)
    if peaked:
        with torch.no_grad():
            for head in search.controller.heads.values():
                head.bias.copy_(torch.randn(head.bias.shape, generator=torch.Generator().manual_seed(5)) * 2)
    fixed = search.controller.sample(64, torch.Generator().manual_seed(7)).subnets

    def entropy() -> float:  # along fixed draws, so sampling noise cannot fake a rise
        with torch.no_grad():
            return search.controller.evaluate(fixed)[1].mean().item()

    before = entropy()
    for _ in range(150):
        m = search.update(lambda subs: torch.full((len(subs),), 0.5))
        assert m["advantage_mean"] == 0.0
    assert entropy() > before + min_rise, (before, entropy())


@pytest.fixture(scope="module")
def space():
    torch.manual_seed(0)
    model = build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1,
                         "options": {"widths": [16, 16, 16]}})
    return space_of(model)


def test_ema_baseline_follows_raw_reward(space):
    search = ControllerSearch(space, RHO)
    accs = [0.3, 0.8, 0.1, 0.5, 0.9, 0.2]
    baseline = None
    for acc in accs:
        m = search.update(lambda subs, a=acc: torch.full((len(subs),), a))
        r = -acc
        assert m["advantage_mean"] == pytest.approx(0.0 if baseline is None else r - baseline, abs=1e-6)
        baseline = r if baseline is None else 0.99 * baseline + 0.01 * r
        assert m["baseline"] == pytest.approx(baseline, abs=1e-6)
        assert m["reward_mean"] == pytest.approx(r)


def _authors_walk_terms(ctrl, sub):
    """The authors' log_p and entropy of one subnet, decision by decision (their ``search.py``:
    p = softmax(full logits) + 1e-6; log_p += sum log p_a; entropy += -sum p_a log p_a over the
    drawn items; decisions that keep every item are drawn and counted too), on advews's heads."""
    draws = ctrl._draws([sub])
    h = torch.zeros(1, ctrl.hidden)
    state, x = (h, h.clone()), ctrl.start[None]
    log_p = entropy = torch.zeros((), dtype=torch.float64)

    def decide(d, x, state):
        nonlocal log_p, entropy
        hx, cx = ctrl.cell(x, state)
        head = ctrl.heads[str(d.index)]
        p = torch.softmax(head(hx).double(), dim=-1)[0] + 1e-6
        a = draws[d.index][0]
        log_p = log_p + p[a].log().sum()
        entropy = entropy - (p[a] * p[a].log()).sum()
        return ctrl.embeds[d.index](a).mean(0, keepdim=True), (hx, cx)

    for block, kept in zip(ctrl.plan, sub.paths):
        x, state = decide(block.paths, x, state)
        for p_idx in kept:
            for d in block.layers[p_idx]:
                x, state = decide(d, x, state)
    return log_p, entropy


def test_authors_objective_matches_their_per_decision_terms_and_gradients():
    torch.manual_seed(0)
    ctrl = Controller(TINY, RHO, hidden=16, objective="authors")
    assert len(ctrl.heads) == 8  # every decision scored, certain ones included (as their code draws them)
    for sub in ctrl.sample(6, torch.Generator().manual_seed(1)).subnets:
        ctrl.zero_grad()
        lp, ent = ctrl.evaluate([sub])
        (lp.sum() + 0.3 * ent.sum()).backward()
        grads = lambda: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in ctrl.parameters()]
        ours = grads()
        ctrl.zero_grad()
        ref_lp, ref_ent = _authors_walk_terms(ctrl, sub)
        assert float(lp.detach()) == pytest.approx(float(ref_lp.detach()), abs=1e-5)
        assert float(ent.detach()) == pytest.approx(float(ref_ent.detach()), abs=1e-5)
        (ref_lp + 0.3 * ref_ent).backward()
        for g, r in zip(ours, grads()):
            assert torch.allclose(g, r, atol=1e-5), (g - r).abs().max()


def test_authors_entropy_gradient_is_far_smaller_than_the_exact_one():
    # DESIGN.md 7 / the review: one decision n = 512, k = 461, logit sd 1: |dH| 18 (exact) vs 0.067 (authors)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 512, generator=g, dtype=torch.float64)
    draw = sample_ordered(logits, 461, g)  # a draw of the policy itself
    norms = []
    for fn in (log_prob_and_entropy, authors_log_prob_and_entropy):
        l = logits.clone().requires_grad_(True)
        fn(l, draw)[1].sum().backward()
        norms.append(float(l.grad.norm()))
    assert 10 < norms[0] < 30 and 0.03 < norms[1] < 0.15, norms
    assert norms[0] / norms[1] > 200


def test_authors_baseline_is_an_ema_of_the_advantage_restarting_each_epoch(space):
    search = ControllerSearch(space, RHO, baseline="advantage", reset_baseline_each_epoch=True)
    b = 0.0
    for epoch, accs in enumerate([[0.3, 0.8, 0.1], [0.5, 0.9]]):
        search.begin_epoch(epoch)
        if epoch:
            b = 0.0  # their AT/TRADES main() hands train() a baseline of 0 every epoch
        for acc in accs:
            m = search.update(lambda subs, a=acc: torch.full((len(subs),), a))
            r = -acc
            adv = r - b if b else r  # their `reward = complementary_accuracy - baseline if baseline else ...`
            assert m["advantage_mean"] == pytest.approx(adv, abs=1e-6)
            b = 0.99 * b + 0.01 * adv
            assert m["baseline"] == pytest.approx(b, abs=1e-6)
    carried = ControllerSearch(space, RHO, baseline="advantage")
    carried.update(lambda subs: torch.full((len(subs),), 0.5))
    carried.begin_epoch(1)
    assert carried.baseline == pytest.approx(-0.005)  # the clean scripts carry it over
    with pytest.raises(AdvewsError, match="baseline"):
        ControllerSearch(space, RHO, baseline="mean")
    with pytest.raises(AdvewsError, match="objective"):
        ControllerSearch(space, RHO, objective="approx")


def test_leave_one_out_advantage(space):
    search = ControllerSearch(space, RHO, num_samples=3, leave_one_out=True)
    adv = search.advantage(torch.tensor([-0.2, -0.5, -0.8]))
    assert torch.allclose(adv, torch.tensor([-0.2 + 0.65, -0.5 + 0.5, -0.8 + 0.35]))
    assert search.baseline == pytest.approx(-0.5)  # the EMA is still tracked, for logging
    with pytest.raises(AdvewsError):
        ControllerSearch(space, RHO, num_samples=1, leave_one_out=True)


STRONG = {0, 1, 2, 3}


def planted_accuracy(subnets):
    """Per block: 1 when the residual branch is dropped, else the fraction of strong channels kept."""
    return torch.tensor([
        sum(len(STRONG & set(c[0][0])) / len(STRONG) if 0 in kept else 1.0 for kept, c in zip(s.paths, s.channels))
        / len(s.paths)
        for s in subnets
    ])


@pytest.mark.parametrize("options", [dict(num_samples=1), dict(num_samples=4, leave_one_out=True)])
def test_controller_learns_planted_weak_subnets(space, options):
    # lr 3e-3 instead of the paper's 3e-4: fast enough to learn within a unit test
    search = ControllerSearch(space, RHO, lr=3e-3, seed=1, **options)
    random_acc = 0.5 * 1.0 + 0.5 * 0.5  # residual kept half the time; then 8 of 16 channels kept
    for _ in range(300 if options["num_samples"] == 1 else 100):
        search.update(planted_accuracy)
    acc = planted_accuracy([search.sample() for _ in range(200)]).mean().item()
    assert acc < random_acc - 0.3, acc


def test_state_dict_round_trip_resumes_exactly(space):
    a = ControllerSearch(space, RHO, num_samples=2, lr=3e-3, seed=3)
    for _ in range(5):
        a.update(planted_accuracy)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = ControllerSearch(space, RHO, num_samples=2, lr=3e-3, seed=99)
    b.load_state_dict(torch.load(buf, weights_only=True))
    rng = torch.get_rng_state()
    assert [a.sample() for _ in range(3)] == [b.sample() for _ in range(3)]
    assert a.update(planted_accuracy) == b.update(planted_accuracy)
    assert all(torch.equal(p, q) for p, q in zip(a.controller.parameters(), b.controller.parameters()))
    assert a.sample() == b.sample() and b.updates == 6
    assert torch.equal(torch.get_rng_state(), rng)  # sampling and updates leave the global RNG alone


def test_controller_subnets_fit_and_run_the_model():
    torch.manual_seed(0)
    model = build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1})
    search = build_search("controller", space_of(model), 0.7)
    alpha = search.sample()
    assert alpha == alpha.canonical() and [len(p) for p in alpha.paths] == [2, 2, 2]
    assert [len(c[0][0]) for c in alpha.channels] == [12, 23, 45]
    with subnet(model, alpha):
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_random_search(space):
    s = RandomSearch(space, RHO, num_samples=3, seed=5)
    state = s.state_dict()
    subs = [s.sample() for _ in range(4)]
    assert len(set(subs)) > 1 and all(x == x.canonical() for x in subs)
    assert all(len(c[0][0]) == 8 for x in subs for kept, c in zip(x.paths, x.channels) if 0 in kept)
    seen = []
    m = s.update(lambda batch: seen.extend(batch) or planted_accuracy(batch))
    assert len(seen) == 3 and m["subnet_acc"] == pytest.approx(planted_accuracy(seen).mean().item())
    s.load_state_dict(state)
    assert [s.sample() for _ in range(4)] == subs


def test_l1_search_keeps_smallest_norm_channels_and_paths():
    torch.manual_seed(0)
    model = build_model({"arch": "small_preact_resnet", "num_classes": 10, "in_channels": 1})
    space = space_of(model)
    with torch.no_grad():
        for block in space.blocks:
            w = block.paths[0].layers[0].module.weight  # residual conv2: input channel i has L1 ~ (c - i)
            c = w.shape[1]
            w.copy_(torch.arange(c, 0, -1, dtype=w.dtype).view(1, c, 1, 1).expand_as(w) * 1e-4)
        space.blocks[1].paths[1].output_module[0].weight.fill_(1.0)   # strong 1x1 shortcut: dropped
        space.blocks[2].paths[1].output_module[0].weight.fill_(1e-6)  # weak 1x1 shortcut: kept
    alpha = L1Search(space, RHO).sample()
    # block 0: identity shortcut (gain 1) is stronger than the residual (gain 0.12): residual kept
    assert alpha.paths == ((0,), (0,), (1,))
    assert alpha.channels[0] == ((tuple(range(8, 16)),),) and alpha.channels[1] == ((tuple(range(16, 32)),),)
    assert L1Search(space, RHO).sample() == alpha
    assert L1Search(space, RHO).update(planted_accuracy)["subnet_acc"] == pytest.approx(
        planted_accuracy([alpha]).item())


def test_build_search_names(space):
    assert isinstance(build_search("random", space, RHO, seed=1), RandomSearch)
    assert isinstance(build_search("l1", space, RHO), L1Search)
    with pytest.raises(AdvewsError, match="controller, random, l1"):
        build_search("evolution", space, RHO)


def test_search_seed_follows_the_run_seed(space):
    """Unseeded searches take torch's seed (train.seed in a run): seeds differ, so do controllers."""
    def first_subnets(seed):
        torch.manual_seed(seed)
        c, r = ControllerSearch(space, RHO), RandomSearch(space, RHO)
        return [c.sample() for _ in range(5)], [r.sample() for _ in range(5)], c.controller.start.detach().clone()

    a, b, other = first_subnets(1), first_subnets(1), first_subnets(2)
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert a[0] != other[0] and a[1] != other[1] and not torch.equal(a[2], other[2])
