"""Not in the paper: a causal check of §4's reading of values.

§4 infers what a memory does from correlations: its value's top token is the token that follows its key's top-1
trigger. Here the memory is switched off where it fired and the model's own prediction is read. For memory i of a
face with sign s (+1 for the positive face, -1 for the negative one) whose value *agrees* with the top-1 trigger's
next token t (argmax of s * v_i . E is t) or *suppresses* it (argmin of s * v_i . E is t), the coefficient m_i is set
to 0 at the trigger's last position only, and

    delta = log p_off(t) - log p_clean(t)

is read there from the full model. Each such memory has a *control*: the memory j != i of the same layer whose
|m_j| * ||v_j|| at that position (the size of what it adds to the residual) is nearest to |m_i| * ||v_i||, ties
broken by a seeded draw, switched off the same way. If values do what their projection says, agreeing memories
lower log p(t) when removed (delta < 0) more than their controls, and suppressing ones raise it (delta > 0).

Exact and cheap: an edit at the last position changes nothing before it, so each trigger prefix runs once without
its last token, keeping the KV cache, and every variant (clean, a memory off, its control off) is a one-token
continuation of a copy of that cache. Prefixes of one length share a batch, so nothing is padded.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..capture import Capture, Intervention, cache_keyword, returned_cache
from ..errors import FfkvError
from .intervals import bootstrap, wilson
from .values import next_token_ids

ROLES = ("agree", "suppress")

DEFINITIONS = {
    "causal_delta": "log p_off(t) - log p_clean(t) of the full model at a memory's top-1 trigger, t the token that "
                    "follows it, with the memory's coefficient set to 0 at the trigger's last position only.",
    "suppress": "a memory face whose value's bottom token, argmin of s * v_i . E (s = +1 positive face, -1 negative "
                "face, raw projection), is the token that follows its top-1 trigger: the mirror of agreement.",
    "causal_control": "for a memory switched off in the causal check, the other memory of its layer whose "
                      "|m_j| * ||v_j|| at the same position is nearest to the memory's |m_i| * ||v_i|| (ties drawn "
                      "with the seed), switched off the same way.",
    "exceeds_control": "share of the checked memories whose |delta| is larger than their control's |delta|.",
}


def value_roles(promoted: np.ndarray, demoted: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(agree, suppress) masks of a layer's memories for one face: the value's top token (``promoted``, argmax of
    s * v . E) is the target, or its bottom token (``demoted``, argmin) is. Never where the target is -1."""
    promoted, demoted, target = np.asarray(promoted), np.asarray(demoted), np.asarray(target)
    has_target = target >= 0
    return has_target & (promoted == target), has_target & (demoted == target)


def face_extremes(atlas, parts, layer: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """face -> (argmax, argmin) of s * v_i . E for every memory of a layer: the atlas's stored top tokens of
    each face (the positive face's bottom token is the negative face's top one), computed from the weights
    for an atlas without them."""
    tensors = atlas.layer_tensors(layer)
    if all(f"value_raw_{face}_ids" in tensors for face in ("pos", "neg")):
        top = {face: tensors[f"value_raw_{face}_ids"][:, 0].to(torch.int64).numpy() for face in ("pos", "neg")}
    else:
        from ..projection import value_extremes

        largest, smallest = value_extremes(parts, layer)
        top = {"pos": largest.numpy(), "neg": smallest.numpy()}
    return {"pos": (top["pos"], top["neg"]), "neg": (top["neg"], top["pos"])}


def nearest_control(strength: np.ndarray, key: int, rng: np.random.Generator) -> int:
    """The memory j != ``key`` whose ``strength`` (|m_j| * ||v_j||) is nearest to the key's; a tie is drawn with
    ``rng``."""
    strength = np.asarray(strength, dtype=np.float64)
    if len(strength) < 2:
        raise FfkvError("a control needs a layer with at least two memories")
    gap = np.abs(strength - strength[key])
    gap[key] = np.inf
    gap[~np.isfinite(gap)] = np.inf
    nearest = np.flatnonzero(gap == gap.min())
    return int(nearest[0] if len(nearest) == 1 else rng.choice(nearest))


class CachedPrefixes:
    """Token prefixes of one length, run once without their last token, keeping the KV cache; every
    continuation by the last token (clean, or with memories switched off at it) runs on a copy of that cache.

    ``model`` is a LoadedModel. An edit at the last position cannot change the positions before it, so each
    continuation equals a full forward of its whole prefix with the same edit."""

    def __init__(self, model, prefixes: Sequence[Sequence[int]]):
        if not prefixes or any(len(p) != len(prefixes[0]) for p in prefixes) or len(prefixes[0]) < 1:
            raise FfkvError("cached prefixes must be one or more non-empty token lists of one length")
        self.model, self.parts = model.model, model.parts
        self.device = model.device
        ids = torch.tensor([list(p) for p in prefixes], dtype=torch.int64, device=self.device)
        self.last = ids[:, -1:]
        self.cache = None
        if ids.shape[1] > 1:
            with torch.inference_mode():
                out = self.parts.body(input_ids=ids[:, :-1], use_cache=True)
            self.cache = returned_cache(out)

    def __len__(self) -> int:
        return self.last.shape[0]

    def _rows(self, rows: Sequence[int]) -> tuple[torch.Tensor, dict]:
        """Last tokens of ``rows`` [len(rows), 1] and the keyword arguments that continue their prefixes."""
        index = torch.as_tensor(list(rows), dtype=torch.int64, device=self.device)
        if len(index) == 0 or int(index.min()) < 0 or int(index.max()) >= len(self):
            raise FfkvError(f"rows must be indices of the {len(self)} cached prefixes")
        if self.cache is None:
            return self.last[index], {"use_cache": False}
        cache = copy.deepcopy(self.cache)  # a forward extends its cache in place; the original stays for others
        cache.batch_select_indices(index)
        return self.last[index], {"use_cache": True, cache_keyword(self.model): cache}

    @torch.inference_mode()
    def coefficients(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Clean coefficients at every prefix's last token: layer -> [n prefixes, d_ff], in the model's dtype."""
        ids, kwargs = self._rows(range(len(self)))
        with Capture(self.parts, layers) as cap:
            cap.run(ids, cache=kwargs.get(cache_keyword(self.model)))
        return cap.m

    @torch.inference_mode()
    def log_probs(self, rows: Sequence[int], off: Sequence[Sequence[tuple[int, int]]],
                  targets: Sequence[int]) -> np.ndarray:
        """float64 [len(rows)]: log p(targets[r]) of the full model after prefix ``rows[r]``, with the memories
        ``off[r]`` ((layer, key) pairs) switched off at its last token only."""
        if not len(rows) == len(off) == len(targets):
            raise FfkvError("rows, off and targets must have one entry per continuation")
        ids, kwargs = self._rows(rows)
        switches = [Intervention(layer, key, "off", positions=(r,)) for r, memories in enumerate(off)
                    for layer, key in memories]
        with Capture(self.parts, interventions=switches, stop=False):
            logits = self.model(input_ids=ids, **kwargs).logits[:, -1]
        log_p = logits.to(torch.float64).log_softmax(dim=-1)
        index = torch.as_tensor(list(targets), dtype=torch.int64, device=log_p.device)
        return log_p.gather(1, index[:, None])[:, 0].cpu().numpy()


@dataclass
class Checked:
    """One memory switched off at its top-1 trigger, and its control."""

    layer: int
    face: str
    role: str
    key: int
    position: int
    """Global position of the trigger's last token in the token store."""
    target: int
    coefficient: float = float("nan")
    """m_i at the trigger (clean)."""
    strength: float = float("nan")
    """|m_i| * ||v_i||."""
    control: int = -1
    control_strength: float = float("nan")
    log_p: float = float("nan")
    """Clean log p(target)."""
    delta: float = float("nan")
    control_delta: float = float("nan")


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, *parts])


def select_memories(atlas, parts, per_layer: int, seed: int = 0) -> tuple[list[Checked], dict]:
    """The memories to check: per layer, face and role, up to ``per_layer`` drawn (seeded) among those whose
    value agrees with / suppresses their top-1 trigger's next token and whose top-1 coefficient is finite and
    non-zero. Returns them and the number of candidates, {(face, role): [n_layers]}."""
    candidates = {(face, role): [None] * atlas.n_layers for face in atlas.faces for role in ROLES}
    chosen = []
    for layer in atlas.layers:
        tensors = atlas.layer_tensors(layer)
        extremes = face_extremes(atlas, parts, layer)
        for f, face in enumerate(atlas.faces):
            positions = tensors[f"{face}_positions"][:, 0].numpy()
            scores = tensors[f"{face}_scores"][:, 0].numpy()
            fired = np.isfinite(scores) & (scores != 0)
            target = np.where(fired, next_token_ids(atlas.store, positions), -1)
            for r, (role, mask) in enumerate(zip(ROLES, value_roles(*extremes[face], target))):
                keys = np.flatnonzero(mask)
                candidates[(face, role)][layer] = int(len(keys))
                drawn = _rng(seed, layer, f, r).choice(keys, min(per_layer, len(keys)), replace=False)
                chosen += [Checked(layer, face, role, int(k), int(positions[k]), int(target[k]))
                           for k in sorted(drawn.tolist())]
    return chosen, candidates


def _batches(atlas, by_position: dict[int, list[Checked]], max_rows: int) -> list[list[tuple[int, list[int]]]]:
    """Triggers grouped by prefix length into batches of at most ``max_rows`` continuations (one clean row per
    trigger and two per checked memory; a trigger with more takes a batch of its own): [(position, ids)]."""
    by_length: dict[int, list[tuple[int, list[int]]]] = {}
    for position in sorted(by_position):
        _, ids, _ = atlas.store.prefix(position)
        by_length.setdefault(len(ids), []).append((position, ids))
    batches = []
    for length in sorted(by_length):
        current, rows = [], 0
        for position, ids in by_length[length]:
            need = 1 + 2 * len(by_position[position])
            if current and rows + need > max_rows:
                batches.append(current)
                current, rows = [], 0
            current.append((position, ids))
            rows += need
        batches.append(current)
    return batches


def check_memories(atlas, model, chosen: list[Checked], seed: int = 0, max_rows: int = 96,
                   progress: bool = True) -> list[Checked]:
    """Switch each chosen memory and its control off at the memory's top-1 trigger; fills in their deltas."""
    parts = model.parts
    by_position: dict[int, list[Checked]] = {}
    for c in chosen:
        by_position.setdefault(c.position, []).append(c)
    norms: dict[int, np.ndarray] = {}
    faces = {face: f for f, face in enumerate(atlas.faces)}
    batches = _batches(atlas, by_position, max_rows)
    for batch in tqdm(batches, desc="causal check (trigger batches)", disable=not progress, dynamic_ncols=True):
        prefixes = CachedPrefixes(model, [ids for _, ids in batch])
        layers = sorted({c.layer for position, _ in batch for c in by_position[position]})
        clean = prefixes.coefficients(layers)
        rows, off, targets, slots = [], [], [], []
        for row, (position, _) in enumerate(batch):
            checked = by_position[position]
            rows.append(row)
            off.append(())
            targets.append(checked[0].target)
            slots.append((None, "clean"))
            for c in checked:
                if c.layer not in norms:
                    values = parts.added_values(c.layer)  # |m| * ||v as added|| is what the memory writes
                    norms[c.layer] = values.to(torch.float64).norm(dim=1).cpu().numpy()
                m = clean[c.layer][row].to(torch.float64).cpu().numpy()
                strength = np.abs(m) * norms[c.layer]
                c.coefficient, c.strength = float(m[c.key]), float(strength[c.key])
                c.control = nearest_control(strength, c.key, _rng(seed, c.layer, faces[c.face], c.key))
                c.control_strength = float(strength[c.control])
                rows += [row, row]
                off += [((c.layer, c.key),), ((c.layer, c.control),)]
                targets += [c.target, c.target]
                slots += [(c, "delta"), (c, "control_delta")]
        log_p = prefixes.log_probs(rows, off, targets)
        clean_log_p = None
        for (c, what), value in zip(slots, log_p):
            if c is None:
                clean_log_p = float(value)
                continue
            c.log_p = clean_log_p
            setattr(c, what, float(value) - clean_log_p)
    return chosen


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _summary(checked: list[Checked], seed: int) -> dict:
    """n, mean deltas with their bootstrap intervals and the share exceeding the control, per role."""
    out = {}
    for role in ROLES:
        mine = [c for c in checked if c.role == role]
        delta = [c.delta for c in mine]
        control = [c.control_delta for c in mine]
        exceeds = sum(abs(c.delta) > abs(c.control_delta) for c in mine)
        out.update({
            f"n_{role}": len(mine),
            f"{role}_delta": _mean(delta), f"{role}_delta_ci": bootstrap(delta, seed=seed),
            f"{role}_control_delta": _mean(control), f"{role}_control_delta_ci": bootstrap(control, seed=seed),
            f"{role}_exceeds_control": exceeds / len(mine) if mine else None,
            f"{role}_exceeds_control_ci": wilson(exceeds, len(mine)),
        })
    return out


def causal_block(atlas, checked: list[Checked], candidates: dict, face: str, per_layer: int, seed: int = 0) -> dict:
    """The ``causal`` block of analysis.json for one face (``causal_neg`` for the negative face)."""
    n_layers = atlas.n_layers
    mine = [c for c in checked if c.face == face]
    per_layer_keys = list(_summary([], seed))
    block: dict = {k: [None] * n_layers for k in per_layer_keys}
    for layer in atlas.layers:
        for k, v in _summary([c for c in mine if c.layer == layer], seed).items():
            block[k][layer] = v
    for role in ROLES:
        block[f"n_{role}_candidates"] = candidates[(face, role)]
    block["all_layers"] = _summary(mine, seed)
    block["memories_per_layer"] = per_layer
    block["memories"] = [{k: v for k, v in asdict(c).items() if k != "face"} for c in mine]
    block["definitions"] = dict(DEFINITIONS)
    return block


def causal_experiment(atlas, model, per_layer: int = 8, seed: int = 0, progress: bool = True) -> dict[str, dict]:
    """face -> the ``causal`` block of that face: up to ``per_layer`` agreeing and as many suppressing memories per
    layer and face switched off at their top-1 trigger, each beside its control."""
    if isinstance(per_layer, bool) or not isinstance(per_layer, int) or per_layer < 1:
        raise FfkvError(f"memories per layer for the causal check must be a positive integer, not {per_layer!r}")
    chosen, candidates = select_memories(atlas, model.parts, per_layer, seed)
    checked = check_memories(atlas, model, chosen, seed, progress=progress)
    return {face: causal_block(atlas, checked, candidates, face, per_layer, seed) for face in atlas.faces}
