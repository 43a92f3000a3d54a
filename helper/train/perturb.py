"""Perturbation searches shared by the unlearning defenses (``ibau``, ``sau``, ``nc``) and ``scan.py``.

Small functions on [0, 1] images; a model is any callable from images to logits. Three searches:

- a universal perturbation ``delta`` (one for all images) climbing a divergence, projected to an L2 ball
  (I-BAU, ABD's self-retrospection): ``ascent_step`` + ``project``;
- per-sample PGD in an L-infinity ball for *shared* adversarial examples, which send the purified model and
  the frozen reference to the same wrong class (SAU): ``shared_pgd``, ``shared_masks``, ``sau_shared_loss``;
- the smallest trigger of a family that sends most images to one class (Neural Cleanse's mask and pattern,
  and a universal L2 perturbation): ``minimal_trigger``, scored over classes by ``anomaly_index``.

A perturbed image is always ``stamp(x, delta) = clip(x + delta, 0, 1)``: a valid image.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from helper.run.checkpoint import safe_load
from helper.run.errors import UserError

MAD_CONSISTENCY = 1.4826  # MAD of a normal sample x this = its standard deviation (Neural Cleanse)


# ---------------------------------------------------------------- projections and one ascent step

def stamp(x, delta):
    """``clip(x + delta, 0, 1)``: the perturbed images, valid pixels (``delta`` broadcasts: universal or per sample)."""
    return (x + delta).clamp(0, 1)


def l2_norms(delta):
    """The L2 norm of each sample of ``delta`` (dim 0), shape (N,)."""
    return delta.flatten(1).norm(dim=1)


def project(delta, radius, norm="l2"):
    """``delta`` projected onto the ball of ``radius``, per sample (dim 0).

    l2:   ``delta * min(1, radius / ||delta||_2)``;  linf: ``clip(delta, -radius, radius)``."""
    if norm == "linf":
        return delta.clamp(-radius, radius)
    if norm != "l2":
        raise ValueError(f"norm must be 'l2' or 'linf', not {norm!r}")
    scale = (radius / l2_norms(delta).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale.view(-1, *([1] * (delta.dim() - 1)))


def ascent_step(delta, grad, step, norm="l2"):
    """One steepest-ascent step of size ``step`` in the norm's geometry, per sample (dim 0):

    l2:   ``delta + step * grad / ||grad||_2`` (a zero gradient leaves ``delta`` where it is);
    linf: ``delta + step * sign(grad)`` (PGD)."""
    if norm == "linf":
        return delta + step * grad.sign()
    if norm != "l2":
        raise ValueError(f"norm must be 'l2' or 'linf', not {norm!r}")
    g = l2_norms(grad).view(-1, *([1] * (grad.dim() - 1)))
    return delta + step * grad / g.clamp_min(1e-12)


def soft_kl(target_logits, logits):
    """``KL(softmax(target) || softmax(logits))`` per sample, summed over classes, batch mean; fp32; the
    target carries no gradient. The unlearning term ``D``: the student's answer on a perturbed image against
    the teacher's answer on the clean one (temperature 1, the soft form of the label's cross-entropy)."""
    log_p = F.log_softmax(target_logits.detach().float(), 1)
    return (log_p.exp() * (log_p - F.log_softmax(logits.float(), 1))).sum(1).mean()


def class_kl(target_logits, logits, c):
    """The binary KL of one class's probability: with ``p = softmax(target)_c`` and ``q = softmax(logits)_c``,

        p log(p / q) + (1 - p) log((1 - p) / (1 - q)),

    per sample, batch mean; fp32; the target carries no gradient. The unlearning term restricted to a suspected
    target class ``c``: the student's probability of ``c`` on a perturbed image against the teacher's on the clean
    one, the other classes free to move among themselves."""
    def split(z):  # (log p_c, log (1 - p_c)) from log-probabilities
        rest = torch.cat([z[:, :c], z[:, c + 1:]], 1)
        return z[:, c], torch.logsumexp(rest, 1)
    log_p, log_not_p = split(F.log_softmax(target_logits.detach().float(), 1))
    log_q, log_not_q = split(F.log_softmax(logits.float(), 1))
    return (log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)).mean()


def random_direction(shape, radius, generator, device="cpu"):
    """A random point on the L2 sphere of ``radius`` (per sample of dim 0), from a seeded ``generator``."""
    d = torch.randn(shape, generator=generator).to(device)
    return d * (radius / l2_norms(d).clamp_min(1e-12)).view(-1, *([1] * (d.dim() - 1)))


def input_grad(loss_fn, x, delta):
    """``(loss, d loss / d delta)`` of ``loss_fn(stamp(x, delta))`` with every model's weights left untouched."""
    d = delta.detach().requires_grad_(True)
    loss = loss_fn(stamp(x, d))
    return loss.detach(), torch.autograd.grad(loss, d)[0]


# ---------------------------------------------------------------- SAU: shared adversarial examples

@dataclass
class SharedMasks:
    fooled_model: torch.Tensor  # the purified model's perturbed answer differs from its clean answer
    fooled_ref: torch.Tensor    # the reference's perturbed answer differs from its clean answer
    common: torch.Tensor        # both fooled
    shared: torch.Tensor        # both fooled, to the same class


def shared_masks(model_pert, ref_pert, model_clean_label, ref_clean_label):
    """SAU's selection from the argmax labels (or logits) of both models on perturbed and clean images."""
    lab = [t.argmax(1) if t.dim() == 2 else t for t in (model_pert, ref_pert, model_clean_label, ref_clean_label)]
    fooled_model, fooled_ref = lab[0] != lab[2], lab[1] != lab[3]
    common = fooled_model & fooled_ref
    return SharedMasks(fooled_model, fooled_ref, common, common & (lab[0] == lab[1]))


def shared_adv_loss(model_pert, ref_pert, labels, masks, beta_1=0.01, beta_2=1.0):
    """The loss SAU's PGD *descends* (its ``Shared_PGD.attack``), for logits on the perturbed images:

        L = beta_1 * -(sum of CE(model, y) over samples the model is not fooled on
                       + sum of CE(ref, y) over samples the reference is not fooled on) / (2 N)
          + beta_2 * sum of JS(p_model || p_ref) over the samples not yet shared / N

    (fool both, and towards the same class); ``y`` is the label (here the teacher's clean answer)."""
    n = labels.shape[0]
    ce_m = F.cross_entropy(model_pert.float(), labels, reduction="none")
    ce_r = F.cross_entropy(ref_pert.float(), labels, reduction="none")
    adv = -((ce_m * (~masks.fooled_model)).sum() + (ce_r * (~masks.fooled_ref)).sum()) / 2 / n
    p_m = F.softmax(model_pert.float(), 1).clamp_min(1e-8)
    p_r = F.softmax(ref_pert.float(), 1).clamp_min(1e-8)
    mix = 0.5 * (p_m + p_r)
    js = (0.5 * (p_m * p_m.log() + p_r * p_r.log()) - 0.5 * (p_m * mix.log() + p_r * mix.log())).sum(1)
    return beta_1 * adv + beta_2 * (js * (~masks.shared)).sum() / n


def shared_pgd(model, ref, x, labels, bound=0.2, step=0.2, steps=5, beta_1=0.01, beta_2=1.0, ref_clean=None):
    """SAU's search: per-sample ``delta`` in the L-inf ball of ``bound``, started at ``+bound`` (its ``max``
    init), ``steps`` signed steps descending ``shared_adv_loss``, each followed by the projection; stops early
    once every sample is shared. Both models as given (eval mode is the caller's); returns ``delta`` (detached).
    ``model`` and ``ref`` are callables; no weight of either moves. ``ref_clean``: the reference's labels on
    ``x`` when the caller has them (a forward saved)."""
    with torch.no_grad():
        clean_model = model(x).argmax(1)
        clean_ref = ref(x).argmax(1) if ref_clean is None else ref_clean
    delta = torch.full_like(x, float(bound))
    for _ in range(steps):
        d = delta.detach().requires_grad_(True)
        xp = stamp(x, d)
        m_logits, r_logits = model(xp), ref(xp)
        masks = shared_masks(m_logits.detach(), r_logits.detach(), clean_model, clean_ref)
        loss = shared_adv_loss(m_logits, r_logits, labels, masks, beta_1, beta_2)
        grad = torch.autograd.grad(loss, d)[0]
        delta = project(ascent_step(delta, -grad, step, "linf"), bound, "linf")
        if bool(masks.shared.all()):
            break
    return delta.detach()


def sau_shared_loss(model_pert_logits, ref_pert_label, ref_fooled):
    """SAU's unlearning term over the samples the reference is fooled on (``potential_poison``), as its code:

        L = [sum of -log(1e-6 + min(1 - p, 0.999)) + sum of -log(1 + 1e-6 - max(p, 0.001))] / 2 / N

    with ``p`` the purified model's probability of the reference's perturbed class: both halves are
    ``-log(1 - p)``, written two ways for numerical range (its comment); 0 when nothing is fooled."""
    p = F.softmax(model_pert_logits.float(), 1).gather(1, ref_pert_label[:, None]).squeeze(1)
    neg = (1 - p).clamp(max=0.999)
    terms = -torch.log(1e-6 + neg) - torch.log(1 + 1e-6 - p.clamp(min=0.001))
    return (terms * ref_fooled).sum() / 2 / model_pert_logits.shape[0]


# ---------------------------------------------------------------- the smallest trigger towards a class

STATISTICS = ("ratio", "log_mad", "mad")
# each statistic's default threshold. ratio: 2.5 separates the eight teachers of docs/experiments.md (clean up to
# 1.89, backdoored from 2.71); 3, chosen on six of them first, missed the seventh (a width-16 ADBA teacher, 2.71)
THRESHOLDS = {"ratio": 2.5, "log_mad": 2.0, "mad": 2.0}


def anomaly_index(norms, statistic="mad"):
    """How anomalously small each class's trigger is, by ``statistic``:

    - ``mad``: Neural Cleanse's anomaly index, as the SAU repository's port computes it: ``|n_c - median| /
      (1.4826 * MAD)``, MAD = median of ``|n - median|``; ``torch.median`` (the lower middle of an even count);
    - ``log_mad``: the same on ``ln n``;
    - ``ratio``: ``median / n_c``, how many times smaller than the median class's trigger it is.

    The MAD indices measure the distance in units of the other classes' spread, so a spread that happens to be
    tight (a clean teacher whose triggers all need 40-55) makes an ordinary small class anomalous, and a wide one
    (10-60) hides a trigger ten times smaller than the median; the ratio does not depend on the spread
    (docs/experiments.md, "The scan's statistic"). Returns (index per class, median, MAD x 1.4826), the last two
    of the sizes (of their logarithms for ``log_mad``)."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, not {statistic!r}")
    n = torch.as_tensor(norms, dtype=torch.float64)
    if statistic == "log_mad":
        n = n.clamp_min(1e-12).log()
    median = n.median()
    mad = MAD_CONSISTENCY * (n - median).abs().median()
    if statistic == "ratio":
        return median / n.clamp_min(1e-12), float(median), float(mad)
    return (n - median).abs() / mad.clamp_min(1e-12), float(median), float(mad)


def flagged_classes(norms, threshold=None, statistic="mad"):
    """Classes whose trigger is smaller than the median and whose anomaly index of ``statistic`` exceeds
    ``threshold`` (default: the statistic's, ``THRESHOLDS``), smallest trigger first (Neural Cleanse's rule)."""
    threshold = THRESHOLDS[statistic] if threshold is None else threshold
    index, _, _ = anomaly_index(norms, statistic)
    n = torch.as_tensor(norms, dtype=torch.float64)
    median = n.median()
    hits = [c for c in range(len(n)) if n[c] < median and index[c] > threshold]
    return sorted(hits, key=lambda c: float(n[c]))


class MaskPattern:
    """Neural Cleanse's family ``x (1 - m) + p m``: ``m = mask_max (tanh(a) + 1) / 2`` (one channel),
    ``p = (tanh(b) + 1) / 2``; its size is ``||m||_1``. ``params`` are (a, b)."""
    name = "mask"

    def __init__(self, mask_max=1.0, lr=0.1):
        self.mask_max, self.lr = mask_max, lr

    def init(self, shape, generator, device):
        c, h, w = shape
        return [(torch.rand((1, h, w), generator=generator) * 2 - 1).to(device),
                (torch.rand((c, h, w), generator=generator) * 2 - 1).to(device)]

    def trigger(self, params):
        """(mask, pattern) of the parameters."""
        a, b = params
        return self.mask_max * (torch.tanh(a) + 1) / 2, (torch.tanh(b) + 1) / 2

    def apply(self, x, params):
        m, p = self.trigger(params)
        return x * (1 - m) + p * m

    def size(self, params):
        return self.trigger(params)[0].abs().sum()


class Universal:
    """A universal perturbation ``clip(x + delta, 0, 1)``; its size is ``||delta||_2``. ``params`` are (delta,)."""
    name = "universal"

    def __init__(self, lr=0.01):
        self.lr = lr

    def init(self, shape, generator, device):
        return [torch.zeros(shape, device=device)]

    def trigger(self, params):
        return params[0]

    def apply(self, x, params):
        return stamp(x, params[0])

    def size(self, params):
        return params[0].norm()


@dataclass
class Inverted:
    target: int
    size: float        # the smallest size that reached ``success`` (the last size if none did)
    success: float     # its share of images sent to ``target``
    reached: bool      # whether any pass reached the success goal
    params: list       # the trigger's parameters at that point (detached)
    passes: int = 0    # passes run (fewer than asked when ``stop`` ended the search)


def minimal_trigger(model, images, target, family, passes=30, batch_size=100, success=0.98, init_cost=1e-3,
                    patience=2, generator=None, params=None, stop=0, trace=None):
    """The smallest trigger of ``family`` that sends ``success`` of ``images`` to ``target`` (Neural Cleanse's
    search): Adam (lr ``family.lr``, betas 0.5, 0.9) on ``CE(model(apply(x)), target) + cost * size``, ``passes``
    passes over ``images`` in order; after each pass the cost goes x2 when the pass's attack success was
    >= ``success`` for ``patience`` passes in a row, /2^1.5 when it was below for as long; the smallest trigger
    of a successful pass is kept (its last batch's trigger, the one whose answers ended the pass; with one batch
    per pass its success is exact). ``params`` warm-starts the search. No weight of ``model`` moves.

    ``stop`` > 0 ends the search once the goal has been reached and ``stop`` passes in a row have not shrunk the
    smallest successful trigger by 1% (Neural Cleanse's early stop, its threshold 0.99); 0 runs every pass.
    ``trace``: a list that gets one ``(rate, size, cost)`` per pass."""
    generator = generator or torch.Generator().manual_seed(0)
    device = images.device
    params = [p.detach().clone().requires_grad_(True) for p in
              (params or family.init(tuple(images.shape[1:]), generator, device))]
    opt = torch.optim.Adam(params, lr=family.lr, betas=(0.5, 0.9))
    cost, up, down, stale, done = init_cost, 0, 0, 0, 0
    best = None
    labels = torch.full((len(images),), int(target), dtype=torch.long, device=device)
    for done in range(1, passes + 1):
        hits = torch.zeros((), device=device)  # summed on the device: one host read per pass
        for i in range(0, len(images), batch_size):
            x, y = images[i:i + batch_size], labels[i:i + batch_size]
            logits = model(family.apply(x, params))
            size = family.size(params)
            loss = F.cross_entropy(logits.float(), y) + cost * size
            used = [p.detach().clone() for p in params]  # the trigger these logits answered to
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
            opt.step()
            hits += (logits.detach().argmax(1) == y).sum()
        rate, size = hits.item() / len(images), float(size.detach())
        if trace is not None:
            trace.append((rate, size, cost))
        if rate >= success and (best is None or size < 0.99 * best.size):
            stale = 0
        elif best is not None:
            stale += 1
        if rate >= success and (best is None or size < best.size):
            best = Inverted(int(target), size, rate, True, used)
        up, down = (up + 1, 0) if rate >= success else (0, down + 1)
        if up >= patience:
            cost, up = cost * 2, 0
        elif down >= patience:
            cost, down = cost / 2 ** 1.5, 0
        if stop and best is not None and stale >= stop:
            break
    if best is None:
        with torch.no_grad():
            rate = sum(int((model(family.apply(images[i:i + batch_size], params)).argmax(1) == int(target)).sum())
                       for i in range(0, len(images), batch_size)) / len(images)
        best = Inverted(int(target), float(family.size(params).detach()), rate, False, [p.detach().clone() for p in params])
    best.passes = done
    return best


def invert_all(model, images, family, classes, traces=None, **kw):
    """``minimal_trigger`` for every class of ``classes``, each from its own seeded start; a list of ``Inverted``.
    ``traces``: a list that gets each class's per-pass ``(rate, size, cost)`` list."""
    found = []
    for c in classes:
        trace = [] if traces is not None else None
        found.append(minimal_trigger(model, images, c, family, generator=torch.Generator().manual_seed(1000 + c),
                                     trace=trace, **kw))
        if traces is not None:
            traces.append(trace)
    return found


INVERTED = "inverted.pt"  # scan.py's inverted triggers: {family: [per class: its parameters]}


def load_inverted(folder, family, target):
    """The parameters of the trigger of ``family`` that ``scan.py`` inverted towards class ``target``, from its
    folder's ``inverted.pt`` (read weights-only); a missing or foreign file is one UserError naming it."""
    path = os.path.join(folder, INVERTED)
    found = safe_load(path, "scan.py's inverted triggers")
    if not isinstance(found, dict) or not isinstance(found.get(family), list) or not 0 <= target < len(found[family]):
        raise UserError(f"{path} holds no {family} trigger of class {target} (is {folder} a scan.py folder?)")
    return [p.float() for p in found[family][target]]


def effect(model, x, x_pert):
    """What a perturbation does to a model on a batch: share of images whose answer changes (``flip``), the
    class most perturbed images go to and its share (``top``, ``top_share``); one host sync."""
    with torch.no_grad():
        clean, pert = model(x).argmax(1), model(x_pert).argmax(1)
    counts = torch.bincount(pert, minlength=1)
    stats = torch.stack([(clean != pert).float().mean(), counts.argmax().float(), counts.max() / len(pert)]).tolist()
    return {"flip": stats[0], "top": int(stats[1]), "top_share": stats[2]}

