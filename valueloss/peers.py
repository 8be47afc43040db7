"""The clipped value loss as eight published projects write it, re-implemented side by side.

Libraries disagree on what "clipped value loss" means. Each function below is *our own code*
for one published formula, written from reading the source named in its docstring (repository,
file, function; checked on 2026-11-25, verl against its release 0.9.1 on 2026-12-03). They keep each
peer's quirks on purpose -- how the clipped prediction is formed, the factor 0.5 or not, the reduction,
and what an empty mask does (most give NaN) -- so that notebook 07 can put them next to each other and
next to :class:`valueloss.ValueLoss`.

Three ways to write the clipped prediction appear. They give the same numbers up to the last bit, but
not the same gradient exactly on a band edge:

* **offset form** ``old + (v - old).clamp(-eps, eps)`` (baselines ppo2, OpenRLHF, SB3, CleanRL,
  ColossalChat, and :mod:`valueloss.functional`): inside the band, ``old + (v - old)`` is rounded
  twice and differs from ``v`` in the last bit for a small share of float32 elements (see
  :func:`offset_clip_mismatch_fraction`);
* **clamp form** ``clamp(v, old - eps, old + eps)`` (TRL, DeepSpeed-Chat): bitwise ``v`` inside the band;
* **min-max form** ``max(min(v, old + eps), old - eps)`` (verl's ``clip_by_value``): bitwise ``v``
  inside the band, like the clamp form.

Where the two branches of the ``max`` then differ by one rounding step, the per-token loss and the
reported clip fraction can differ in the last bits; gradients strictly inside the band are identical
(both branches pass the same gradient there). Exactly on a band edge, ``v == old - eps`` or
``v == old + eps``, the clipped prediction is ``v`` itself, so the two branches of the ``max`` tie and
each gets half of ``2 (v - R)``; what the clipped branch passes on is then a convention of the clip op,
not rounding:

* ``clamp`` with number bounds (the offset form) passes all of it up to torch 2.13 and none from torch
  2.14 (pytorch/pytorch#184574; :data:`valueloss.functional.BAND_CLOSED` says which the installed torch
  does), so the token gets all of ``2 (v - R)`` or half of it; ``ValueLoss`` is on this side;
* ``clamp`` with tensor bounds (the clamp form) passes all of it up to torch 2.13, half from 2.14;
* ``torch.min`` and ``torch.max`` split the gradient evenly between equal inputs, so the min-max form
  passes half of it on any torch: an edge token gets three quarters of ``2 (v - R)`` from verl.

With values on the bfloat16 grid and verl's default ``cliprange_value=0.5``, 3 to 8 tokens in a
thousand sit exactly on an edge in our test batches, and there verl's gradient is 3/4 of ``ValueLoss``'s
(3/2 of it from torch 2.14); ``tests/test_peers.py`` checks the share and the factor on the installed torch.

:data:`PEERS` is the table that says which :class:`~valueloss.ValueLoss` settings reproduce each
peer, and whether exactly (bitwise on our test batches), within floating-point tolerance, or within
tolerance except on band edges.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor

from .functional import check_clip_eps
from .loss import ValueLoss

__all__ = [
    "CHECKED",
    "PEERS",
    "Peer",
    "PeerResult",
    "VERL_CHECKED",
    "VERL_RELEASE",
    "baselines_ppo2_value_loss",
    "cleanrl_value_loss",
    "colossalchat_value_loss",
    "deepspeed_chat_value_loss",
    "empty_mask_behaviour",
    "format_peer_table",
    "format_results",
    "offset_clip_mismatch_fraction",
    "openrlhf_value_loss",
    "pairwise_agreement",
    "peer_gradient_map",
    "run_peers",
    "sb3_value_loss",
    "trl_value_loss",
    "verl_agg_loss",
    "verl_value_loss",
]

CHECKED = "2026-11-25"
"""Date on which the sources cited in this module were read (verl's release: :data:`VERL_CHECKED`)."""

VERL_RELEASE = "0.9.1"
"""The verl release :func:`verl_value_loss` and :func:`verl_agg_loss` follow (the PyPI wheel ``verl-0.9.1``)."""

VERL_CHECKED = "2026-12-03"
"""Date on which verl's release :data:`VERL_RELEASE` was read."""


# --------------------------------------------------------------------------- helpers


def _same_shape(**tensors: Tensor | None) -> None:
    items = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{first_name} and {name} must have the same shape; got {tuple(first.shape)} and {tuple(t.shape)}"
            )


def _clip_offset(values: Tensor, old_values: Tensor, clip_eps: float) -> Tensor:
    """The offset form: ``old + (v - old).clamp(-eps, eps)``."""
    return old_values + (values - old_values).clamp(-clip_eps, clip_eps)


def _clip_clamp(values: Tensor, old_values: Tensor, clip_eps: float) -> Tensor:
    """The clamp form: ``clamp(v, old - eps, old + eps)`` (bitwise ``v`` inside the band)."""
    return torch.clamp(values, old_values - clip_eps, old_values + clip_eps)


def _clip_min_max(values: Tensor, old_values: Tensor, clip_eps: float) -> Tensor:
    """The min-max form, verl's ``clip_by_value(v, old - eps, old + eps) = max(min(v, old + eps), old - eps)``.

    Bitwise ``v`` inside the band. ``torch.min`` and ``torch.max`` split the gradient evenly between
    equal inputs, so ``v`` gets half of it on either edge (a quarter when ``eps == 0``).
    """
    return torch.max(torch.min(values, old_values + clip_eps), old_values - clip_eps)


def _require_eps(clip_eps: object, name: str = "clip_eps") -> float:
    value = check_clip_eps(clip_eps, name)
    if value is None:
        raise ValueError(f"{name} must be a non-negative number for this peer; got None")
    return value


# --------------------------------------------------------------------------- the peers


def baselines_ppo2_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, *, clip_eps: float) -> Tensor:
    """OpenAI baselines ppo2: ``0.5 * mean(max((v_clip - R)^2, (v - R)^2))`` over every element.

    Source: ``openai/baselines``, ``baselines/ppo2/model.py``, ``Model.__init__`` (``vpredclipped``,
    ``vf_losses1/2``, ``vf_loss``), checked 2026-11-25. The clip range is the *policy's*
    ``CLIPRANGE`` (one placeholder for both), offset form, plain mean (no mask); the total loss
    then multiplies by ``vf_coef``. An empty batch gives NaN (mean of nothing).
    """
    clip_eps = _require_eps(clip_eps)
    _same_shape(values=values, old_values=old_values, returns=returns)
    values_clipped = _clip_offset(values, old_values, clip_eps)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    return 0.5 * torch.maximum(loss_unclipped, loss_clipped).mean()


def openrlhf_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor | None = None,
    *,
    clip_eps: float | None = None,
    token_level_loss: bool = True,
) -> Tensor:
    """OpenRLHF ``ValueLoss``: max form, masked token mean or mean of per-sequence masked means, times 0.5.

    Source: ``OpenRLHF/OpenRLHF``, ``openrlhf/models/loss.py``, ``ValueLoss.forward`` with
    ``masked_mean`` from ``openrlhf/models/utils.py`` (``(x * m).sum(dim) / m.sum(dim)``), checked
    2026-11-25. Offset form; ``clip_eps=None`` disables clipping. ``token_level_loss=False``
    averages per-sequence means over *all* rows, so an empty row -- or an empty mask -- gives NaN.
    (Newer OpenRLHF releases route the reduction through a verl-style ``agg_loss`` with global
    counts; :func:`verl_agg_loss` implements that contract.)
    """
    clip_eps = check_clip_eps(clip_eps)
    _same_shape(values=values, old_values=old_values, returns=returns, action_mask=action_mask)
    if clip_eps is not None:
        values_clipped = _clip_offset(values, old_values, clip_eps)
        loss = torch.max((values_clipped - returns) ** 2, (values - returns) ** 2)
    else:
        loss = (values - returns) ** 2
    if action_mask is None:
        loss = loss.mean() if token_level_loss else loss.mean(dim=-1).mean()
    elif token_level_loss:
        loss = (loss * action_mask).sum() / action_mask.sum()
    else:
        loss = ((loss * action_mask).sum(dim=-1) / action_mask.sum(dim=-1)).mean()
    return 0.5 * loss


def verl_agg_loss(
    loss_mat: Tensor,
    loss_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    *,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """verl's ``agg_loss``: reduce a ``(B, T)`` loss with one of five modes and optional global counts.

    Source: ``volcengine/verl`` release 0.9.1, ``verl/trainer/ppo/core_algos.py``, ``agg_loss`` with
    ``verl/utils/torch_functional.py``, ``masked_sum`` (read 2026-12-03). The five modes are
    ``token-mean``, ``token-sum``, ``seq-mean-token-sum``, ``seq-mean-token-mean`` and
    ``seq-mean-token-sum-norm``; anything else raises ``ValueError`` as verl does. ``token-mean``
    divides the masked sum (masked-out entries replaced by 0 first, so a NaN there stays out) by the
    token count; ``token-sum`` multiplies the masked sum by ``dp_size``; the ``seq-mean`` modes sum
    ``loss_mat * loss_mask`` per row, divide by ``n_s + 1e-8`` for ``seq-mean-token-mean``, and average
    over the rows with at least one token. A missing global count with ``dp_size > 1`` raises. There is
    no guard for a zero count: an empty mask gives 0/0 = NaN in every mode but ``token-sum`` (0).
    """
    mask = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode in ("token-mean", "token-sum"):
        masked_sum = (torch.where(loss_mask.bool(), loss_mat, 0.0) * mask).sum()
        if loss_agg_mode == "token-sum":
            return masked_sum * dp_size
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("batch_num_tokens (global) is required when dp_size > 1")
            batch_num_tokens = mask.sum()
        return masked_sum / batch_num_tokens * dp_size
    if loss_agg_mode not in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode!r}")
    row_counts = mask.sum(dim=-1)
    row_losses = (loss_mat * mask).sum(dim=-1)
    if loss_agg_mode == "seq-mean-token-mean":
        row_losses = row_losses / (row_counts + 1e-8)
    row_nonempty = (row_counts > 0).to(loss_mat.dtype)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        global_batch_size = row_nonempty.sum()
    loss = (torch.where(row_nonempty.bool(), row_losses, 0.0) * row_nonempty).sum() / global_batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1])
    return loss


def verl_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    *,
    clip_eps: float,
    loss_agg_mode: str = "token-mean",
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
    loss_scale_factor: float | None = None,
) -> tuple[Tensor, Tensor]:
    """verl ``compute_value_loss``: min-max clip, ``0.5 * agg_loss(max(...))``, and the clip fraction.

    Source: ``volcengine/verl`` release 0.9.1 (read 2026-12-03), ``verl/trainer/ppo/core_algos.py``,
    ``compute_value_loss`` (``vpredclipped = verl_F.clip_by_value(vpreds, values - cliprange_value,
    values + cliprange_value)``, ``vf_loss = 0.5 * agg_loss(torch.max(vf_losses1, vf_losses2), ...)``,
    ``vf_clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1))``), and
    ``verl/utils/torch_functional.py``, ``clip_by_value`` (``torch.max(torch.min(x, tensor_max),
    tensor_min)``, unchanged from release 0.4.1 to 0.9.1) and ``masked_mean`` (``+ 1e-8`` in the
    denominator). Returns ``(vf_loss, vf_clipfrac)``; the reduction is :func:`verl_agg_loss`.

    At a band edge, ``values == old_values + clip_eps`` or ``values == old_values - clip_eps`` exactly,
    the clipped prediction is ``values`` itself, so the two branches of the ``max`` tie and each passes
    half of ``2 (v - R)``; ``torch.min`` (upper edge) or ``torch.max`` (lower edge) then splits the
    clipped branch's half again between ``values`` and the bound. Such a token gets 3/4 of ``2 (v - R)``
    (times the token's weight and 0.5), on any torch. ``ValueLoss`` gives it all of ``2 (v - R)`` up to
    torch 2.13 and half of it from torch 2.14 (:data:`valueloss.functional.BAND_CLOSED`). Off the edges
    the two agree up to float rounding.

    The clip fraction compares with a *strict* ``>``: a token counts only where the clipped branch is
    strictly larger, i.e. where its gradient is zero. An empty mask gives a clip fraction of 0 and a
    loss of NaN (see :func:`verl_agg_loss`).
    """
    clip_eps = _require_eps(clip_eps)
    _same_shape(values=values, old_values=old_values, returns=returns, response_mask=response_mask)
    values_clipped = _clip_min_max(values, old_values, clip_eps)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    loss_max = torch.max(loss_unclipped, loss_clipped)
    vf_loss = 0.5 * verl_agg_loss(
        loss_max,
        response_mask,
        loss_agg_mode,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
    )
    mask = response_mask.to(loss_max.dtype)
    clipped = torch.gt(loss_clipped, loss_unclipped).to(loss_max.dtype)
    vf_clipfrac = (torch.where(response_mask.bool(), clipped, 0.0) * mask).sum() / (mask.sum() + 1e-8)
    return vf_loss, vf_clipfrac


def trl_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, action_mask: Tensor, *, clip_eps: float
) -> Tensor:
    """TRL's former PPO trainer: clamp form, ``0.5 * masked_mean(max(...))`` with ``cliprange_value``.

    Source: ``huggingface/trl``, ``trl/trainer/ppo_trainer.py``, ``PPOTrainer.loss`` (``clip_by_value``
    = ``max(min(x, hi), lo)``, ``vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)``)
    and the later PPOv2 trainer (``torch.clamp(vpred, mb_values - cliprange_value, ...)``, the same
    reduction over ``~padding_mask_p1``), checked 2026-11-25. ``masked_mean`` is
    ``(x * m).sum() / m.sum()``: NaN for an empty mask.
    """
    clip_eps = _require_eps(clip_eps)
    _same_shape(values=values, old_values=old_values, returns=returns, action_mask=action_mask)
    values_clipped = _clip_clamp(values, old_values, clip_eps)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    return 0.5 * ((torch.max(loss_unclipped, loss_clipped) * action_mask).sum() / action_mask.sum())


def deepspeed_chat_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    *,
    clip_eps: float,
    compute_fp32_loss: bool = False,
) -> Tensor:
    """DeepSpeed-Chat ``critic_loss_fn``: clamp form, ``0.5 * sum(max(...) * mask) / mask.sum()``.

    Source: ``microsoft/DeepSpeedExamples``,
    ``applications/DeepSpeed-Chat/dschat/rlhf/ppo_trainer.py`` (earlier
    ``training/step3_rlhf_finetuning/ppo_trainer.py``), ``DeepSpeedPPOTrainer.critic_loss_fn``,
    checked 2026-11-25. ``compute_fp32_loss`` casts ``values`` and the clipped values to float32
    before the squares. An empty mask gives NaN (0/0).
    """
    clip_eps = _require_eps(clip_eps)
    _same_shape(values=values, old_values=old_values, returns=returns, action_mask=action_mask)
    values_clipped = _clip_clamp(values, old_values, clip_eps)
    if compute_fp32_loss:
        values, values_clipped = values.float(), values_clipped.float()
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    return 0.5 * (torch.max(loss_unclipped, loss_clipped) * action_mask).sum() / action_mask.sum()


def sb3_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, *, clip_range_vf: float | None = None
) -> Tensor:
    """Stable-Baselines3 PPO: MSE of the *clipped prediction*, no ``max``, no 0.5, off by default.

    Source: ``DLR-RM/stable-baselines3``, ``stable_baselines3/ppo/ppo.py``, ``PPO.train``
    (``values_pred = old_values + th.clamp(values - old_values, -clip_range_vf, clip_range_vf)``,
    ``value_loss = F.mse_loss(returns, values_pred)``; ``clip_range_vf=None`` by default, and the
    0.5 lives in ``vf_coef=0.5``), checked 2026-11-25. Outside the band the gradient is zero
    whichever side the return lies on. An empty batch gives NaN.
    """
    clip_range_vf = check_clip_eps(clip_range_vf, "clip_range_vf")
    _same_shape(values=values, old_values=old_values, returns=returns)
    values_pred = values if clip_range_vf is None else _clip_offset(values, old_values, clip_range_vf)
    return ((returns - values_pred) ** 2).mean()


def cleanrl_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, *, clip_eps: float, clip_vloss: bool = True
) -> Tensor:
    """CleanRL ``ppo.py``: max form with the *policy's* ``clip_coef``, ``0.5 * mean``.

    Source: ``vwxyzjn/cleanrl``, ``cleanrl/ppo.py``, the "Value loss" block of the update loop
    (``v_clipped = b_values + torch.clamp(newvalue - b_values, -clip_coef, clip_coef)``,
    ``v_loss = 0.5 * v_loss_max.mean()``; ``clip_vloss=False`` gives ``0.5 * mean((v - R)^2)``),
    checked 2026-11-25. Offset form; an empty batch gives NaN.
    """
    clip_eps = _require_eps(clip_eps, "clip_eps (CleanRL's clip_coef)")
    _same_shape(values=values, old_values=old_values, returns=returns)
    v_loss_unclipped = (values - returns) ** 2
    if not clip_vloss:
        return 0.5 * v_loss_unclipped.mean()
    v_clipped = _clip_offset(values, old_values, clip_eps)
    v_loss_clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()


def colossalchat_value_loss(
    values: Tensor, old_values: Tensor, advantages: Tensor, action_mask: Tensor, *, clip_eps: float = 0.2
) -> Tensor:
    """ColossalChat ``ValueLoss``: rebuilds ``returns = advantages + old_values``, then a masked mean.

    Source: ``hpcaitech/ColossalAI``, ``applications/ColossalChat/coati/models/loss.py``,
    ``ValueLoss.forward`` (default ``clip_eps=0.2``; offset form;
    ``loss = sum(max(...) / sum(mask) * mask)``, i.e. divide *before* the masked sum, then
    ``0.5 * loss``), checked 2026-11-25. Takes advantages, not returns; the rebuilt returns and the
    order of the division make it agree with the others only within rounding. The mask is
    required (ColossalChat calls ``torch.sum(action_mask)``); an empty mask gives NaN (``x / 0 * 0``).
    """
    clip_eps = _require_eps(clip_eps)
    if action_mask is None:
        raise ValueError("action_mask is required by ColossalChat's ValueLoss (it sums the mask); got None")
    _same_shape(values=values, old_values=old_values, advantages=advantages, action_mask=action_mask)
    returns = advantages + old_values
    values_clipped = _clip_offset(values, old_values, clip_eps)
    surr_clipped = (values_clipped - returns) ** 2
    surr_unclipped = (values - returns) ** 2
    loss = torch.max(surr_clipped, surr_unclipped) / torch.sum(action_mask)
    return 0.5 * torch.sum(loss * action_mask)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Peer:
    """One published formula and the :class:`~valueloss.ValueLoss` settings that reproduce it."""

    name: str
    """Short display name."""
    function: Callable[..., Tensor]
    """Our re-implementation (a function of this module)."""
    source: str
    """Repository, file and function the formula was read from."""
    clip_form: str
    """``"offset"`` (``old + clamp(v - old)``), ``"clamp"`` (``clamp(v, old - eps, old + eps)``) or
    ``"min-max"`` (``max(min(v, old + eps), old - eps)``)."""
    reduction: str
    """How the per-token losses become a scalar, in words."""
    valueloss_settings: Mapping[str, object]
    """Keyword arguments of ``ValueLoss`` (besides ``clip_eps``) that reproduce the peer."""
    flat: bool
    """True for peers without a mask (classic RL): feed them ``values[mask]`` etc. and ``ValueLoss`` no mask."""
    agreement: str
    """``"exact"``: bitwise equal losses and gradients on our test batches; ``"tolerance"``: equal up
    to float rounding (relative 1e-6 in float32); ``"edges"``: within tolerance except for tokens
    exactly on a band edge, where the gradient differs by the factor ``why`` states."""
    why: str
    """Why the agreement is not exact (empty for exact peers)."""
    empty_mask: str
    """What the peer returns when no token is unmasked."""
    checked: str = CHECKED
    """When the source was read (and which release, where it is pinned to one)."""
    extra: Mapping[str, object] = field(default_factory=dict)
    """Keyword arguments the peer's own function needs besides the clip range (e.g. its mode)."""
    clip_keyword: str = "clip_eps"
    """The name of the clip range among the peer function's keyword arguments."""
    regresses_on: str = "returns"
    """``"returns"``, or ``"advantages"`` for a peer that takes ``returns - old_values`` and adds
    ``old_values`` back itself (the returns it regresses on are then not bitwise the original ones)."""


def _peer(**kwargs) -> Peer:
    kwargs["valueloss_settings"] = MappingProxyType(dict(kwargs.get("valueloss_settings", {})))
    kwargs["extra"] = MappingProxyType(dict(kwargs.get("extra", {})))
    return Peer(**kwargs)


PEERS: Mapping[str, Peer] = MappingProxyType(
    {
        "baselines ppo2": _peer(
            name="baselines ppo2",
            function=baselines_ppo2_value_loss,
            source="openai/baselines baselines/ppo2/model.py Model.__init__",
            clip_form="offset",
            reduction="0.5 * mean over all elements (no mask)",
            valueloss_settings={},
            flat=True,
            agreement="exact",
            why="",
            empty_mask="NaN (mean of an empty tensor)",
        ),
        "OpenRLHF": _peer(
            name="OpenRLHF",
            function=openrlhf_value_loss,
            source="OpenRLHF/OpenRLHF openrlhf/models/loss.py ValueLoss.forward (+ utils.masked_mean)",
            clip_form="offset",
            reduction="0.5 * masked token mean (token_level_loss=True)",
            valueloss_settings={"token_level_loss": True},
            flat=False,
            agreement="exact",
            why="",
            empty_mask="NaN (0/0)",
        ),
        "OpenRLHF seq-mean": _peer(
            name="OpenRLHF seq-mean",
            function=openrlhf_value_loss,
            source="OpenRLHF/OpenRLHF openrlhf/models/loss.py ValueLoss.forward (+ utils.masked_mean)",
            clip_form="offset",
            reduction="0.5 * mean over rows of per-row masked means (token_level_loss=False)",
            valueloss_settings={"token_level_loss": False},
            flat=False,
            agreement="exact",
            why="",
            empty_mask="NaN (0/0 in every row); an empty row alone also gives NaN",
            extra={"token_level_loss": False},
        ),
        "verl": _peer(
            name="verl",
            function=verl_value_loss,
            source=f"volcengine/verl v{VERL_RELEASE} verl/trainer/ppo/core_algos.py compute_value_loss + agg_loss "
            "(+ verl/utils/torch_functional.py clip_by_value)",
            clip_form="min-max",
            reduction="0.5 * agg_loss(mode, 5 modes) with optional global counts; also returns vf_clipfrac (strict >)",
            valueloss_settings={"loss_agg_mode": "token-mean"},
            flat=False,
            agreement="edges",
            why="min-max form: on a band edge torch.min/max split the gradient, so an edge token gets 3/4 of "
            "2 (v - R) where ValueLoss passes all of it (torch <= 2.13) or half (torch >= 2.14); elsewhere "
            "the offset form's one-ulp misses inside the band, and 1e-8 on each row count in seq-mean-token-mean",
            empty_mask="NaN (0/0 in agg_loss; only token-sum gives 0)",
            checked=f"v{VERL_RELEASE}, {VERL_CHECKED}",
        ),
        "TRL": _peer(
            name="TRL",
            function=trl_value_loss,
            source="huggingface/trl trl/trainer/ppo_trainer.py PPOTrainer.loss (former PPO / PPOv2 trainer)",
            clip_form="clamp",
            reduction="0.5 * masked token mean",
            valueloss_settings={},
            flat=False,
            agreement="tolerance",
            why="clamp form (ulp differences of max() inside the band)",
            empty_mask="NaN (0/0)",
        ),
        "DeepSpeed-Chat": _peer(
            name="DeepSpeed-Chat",
            function=deepspeed_chat_value_loss,
            source="microsoft/DeepSpeedExamples applications/DeepSpeed-Chat ppo_trainer.py critic_loss_fn",
            clip_form="clamp",
            reduction="0.5 * sum(loss * mask) / sum(mask)",
            valueloss_settings={},
            flat=False,
            agreement="tolerance",
            why="clamp form (ulp differences of max() inside the band)",
            empty_mask="NaN (0/0)",
        ),
        "Stable-Baselines3": _peer(
            name="Stable-Baselines3",
            function=sb3_value_loss,
            source="DLR-RM/stable-baselines3 stable_baselines3/ppo/ppo.py PPO.train",
            clip_form="offset",
            reduction="mean over all elements, no 0.5 (it sits in vf_coef), no max",
            valueloss_settings={"variant": "clipped", "scale": 1.0},
            flat=True,
            agreement="exact",
            why="",
            empty_mask="NaN (mean of an empty tensor)",
            clip_keyword="clip_range_vf",
        ),
        "CleanRL": _peer(
            name="CleanRL",
            function=cleanrl_value_loss,
            source="vwxyzjn/cleanrl cleanrl/ppo.py (value loss in the update loop)",
            clip_form="offset",
            reduction="0.5 * mean over all elements (no mask)",
            valueloss_settings={},
            flat=True,
            agreement="exact",
            why="",
            empty_mask="NaN (mean of an empty tensor)",
        ),
        "ColossalChat": _peer(
            name="ColossalChat",
            function=colossalchat_value_loss,
            source="hpcaitech/ColossalAI applications/ColossalChat/coati/models/loss.py ValueLoss.forward",
            clip_form="offset",
            reduction="0.5 * sum(loss / sum(mask) * mask); returns rebuilt as advantages + old_values",
            valueloss_settings={},
            flat=False,
            agreement="tolerance",
            why="returns are rebuilt from advantages (advantages + old_values is not bitwise returns) "
            "and each token is divided by the count before the sum",
            empty_mask="NaN (x / 0 * 0)",
            regresses_on="advantages",
        ),
    }
)
"""Every peer by display name. ``ValueLoss(clip_eps, **peer.valueloss_settings)`` reproduces it."""


def _call_peer(peer: Peer, values, old_values, returns, action_mask, clip_eps) -> Tensor:
    """Call a peer's function the way its record says (flat or masked, its clip keyword, returns or
    advantages); returns the scalar loss (the first element where the peer returns more)."""
    if peer.flat:
        keep = action_mask.bool() if action_mask is not None else torch.ones_like(values, dtype=torch.bool)
        values, old_values, returns = values[keep], old_values[keep], returns[keep]
        masks = ()
    else:
        masks = (action_mask if action_mask is not None else torch.ones_like(values),)
    targets = returns - old_values if peer.regresses_on == "advantages" else returns
    out = peer.function(values, old_values, targets, *masks, **{peer.clip_keyword: clip_eps}, **peer.extra)
    return out[0] if isinstance(out, tuple) else out


def _reproduce(peer: Peer, values, old_values, returns, action_mask, clip_eps) -> Tensor:
    loss_fn = ValueLoss(clip_eps, **peer.valueloss_settings)
    if peer.regresses_on == "advantages":
        returns = (returns - old_values) + old_values  # the returns such a peer actually regresses on
    if peer.flat:
        keep = action_mask.bool() if action_mask is not None else torch.ones_like(values, dtype=torch.bool)
        return loss_fn(values[keep], old_values[keep], returns[keep])
    return loss_fn(values, old_values, returns, action_mask)


@dataclass(frozen=True)
class PeerResult:
    """A peer and ``ValueLoss`` (with the peer's settings) on one batch."""

    name: str
    loss: float
    grad_norm: float
    valueloss_loss: float
    valueloss_grad_norm: float
    max_abs_grad_diff: float
    bitwise_equal: bool
    """Loss and gradient of the peer and of ``ValueLoss`` are bitwise identical."""

    def to_dict(self) -> dict[str, object]:
        """All fields as plain Python values."""
        return dict(self.__dict__)


def _loss_and_grad(fn, values: Tensor) -> tuple[Tensor, Tensor]:
    leaf = values.detach().clone().requires_grad_(True)
    loss = fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return loss.detach(), torch.zeros_like(leaf) if grad is None else grad


def run_peers(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor | None = None,
    *,
    clip_eps: float = 0.2,
    peers: list[str] | None = None,
) -> list[PeerResult]:
    """Run every peer (or the named ones) and its ``ValueLoss`` reproduction on one batch.

    Gradients are taken with autograd with respect to ``values``; masked-out positions get zero
    gradient in both. Flat peers see only the unmasked tokens.
    """
    results = []
    for name in peers if peers is not None else list(PEERS):
        peer = PEERS[name]
        loss, grad = _loss_and_grad(
            lambda v, peer=peer: _call_peer(peer, v, old_values, returns, action_mask, clip_eps), values
        )
        ours, ours_grad = _loss_and_grad(
            lambda v, peer=peer: _reproduce(peer, v, old_values, returns, action_mask, clip_eps), values
        )
        results.append(
            PeerResult(
                name=name,
                loss=float(loss),
                grad_norm=float(grad.norm()),
                valueloss_loss=float(ours),
                valueloss_grad_norm=float(ours_grad.norm()),
                max_abs_grad_diff=float((grad - ours_grad).abs().max()) if grad.numel() else 0.0,
                bitwise_equal=bool(torch.equal(loss, ours.to(loss.dtype)) and torch.equal(grad, ours_grad)),
            )
        )
    return results


def empty_mask_behaviour(clip_eps: float = 0.2, shape: tuple[int, int] = (2, 3)) -> dict[str, str]:
    """What each peer and ``ValueLoss`` return for a batch whose mask selects no token.

    Returns ``{name: "nan" | "0" | "<number>" | "error: <ExceptionType>"}``; ``"ValueLoss"`` is included.
    """
    generator = torch.Generator().manual_seed(0)
    values, old_values, returns = (torch.randn(shape, generator=generator) for _ in range(3))
    mask = torch.zeros(shape)
    out = {}
    for name, peer in PEERS.items():
        try:
            loss = float(_call_peer(peer, values, old_values, returns, mask, clip_eps))
            out[name] = "nan" if loss != loss else ("0" if loss == 0 else f"{loss:.4g}")
        except Exception as error:  # noqa: BLE001 -- we report whatever the peer raises
            out[name] = f"error: {type(error).__name__}"
    loss = float(ValueLoss(clip_eps)(values, old_values, returns, mask))
    out["ValueLoss"] = "nan" if loss != loss else ("0" if loss == 0 else f"{loss:.4g}")
    return out


def offset_clip_mismatch_fraction(values: Tensor, old_values: Tensor, clip_eps: float) -> float:
    """Share of in-band elements where the offset form ``old + (v - old).clamp(-eps, eps)`` is not bitwise ``v``.

    Inside the band (``|v - old| <= eps``) both ``clamp`` calls are no-ops, so the offset form computes
    ``old + (v - old)``: two roundings that need not give back ``v``. ``clamp(v, old - eps, old + eps)``
    returns ``v`` itself. Returns 0.0 when no element is inside the band.
    """
    clip_eps = _require_eps(clip_eps)
    _same_shape(values=values, old_values=old_values)
    inside = (values - old_values).abs() <= clip_eps
    n_inside = int(inside.sum())
    if n_inside == 0:
        return 0.0
    offset = _clip_offset(values, old_values, clip_eps)
    return int((inside & (offset != values)).sum()) / n_inside


def peer_gradient_map(
    name: str, *, clip_eps: float = 0.2, extent: float = 3.0, num: int = 121, old_value: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token gradient ``d loss / d v`` of a peer over the ``(v - old, R - old)`` plane.

    Evaluates the peer on a ``num x num`` grid of tokens with ``v - old`` and ``R - old`` in
    ``[-extent * clip_eps, extent * clip_eps]`` and rescales the gradient of the batch loss to one
    token (multiplies by the number of tokens; every peer here averages over tokens). Returns
    ``(delta, residual, grad)``, each ``(num, num)``, with ``delta = v - old`` varying along columns.
    """
    peer = PEERS[name]
    clip_eps = _require_eps(clip_eps)
    axis = torch.linspace(-extent * clip_eps, extent * clip_eps, num, dtype=torch.float64)
    residual, delta = torch.meshgrid(axis, axis, indexing="ij")
    old_values = torch.full_like(delta, old_value)
    values = old_values + delta
    returns = old_values + residual
    _, grad = _loss_and_grad(lambda v: _call_peer(peer, v, old_values, returns, None, clip_eps), values)
    return delta, residual, grad * delta.numel()


def pairwise_agreement(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    action_mask: Tensor | None = None,
    *,
    clip_eps: float = 0.2,
    rtol: float = 1e-6,
) -> dict[tuple[str, str], str]:
    """For every pair of peers: ``"bitwise"`` (loss and gradient identical), ``"close"`` (within ``rtol``), or
    ``"differs"``. Flat peers see ``values[mask]``; gradients are compared on the full ``values`` tensor."""
    outputs = {}
    for name, peer in PEERS.items():
        outputs[name] = _loss_and_grad(lambda v, peer=peer: _call_peer(peer, v, old_values, returns, action_mask,
                                                                       clip_eps), values)
    names = list(PEERS)
    verdicts = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (loss_a, grad_a), (loss_b, grad_b) = outputs[a], outputs[b]
            if torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b):
                verdicts[(a, b)] = "bitwise"
            elif torch.allclose(loss_a, loss_b, rtol=rtol, atol=0) and torch.allclose(
                grad_a, grad_b, rtol=rtol, atol=rtol * float(grad_a.abs().max())
            ):
                verdicts[(a, b)] = "close"
            else:
                verdicts[(a, b)] = "differs"
    return verdicts


def format_peer_table() -> str:
    """The :data:`PEERS` table as aligned text: clip form, reduction, reproducing settings, agreement."""
    lines = [f"{'peer':<19}{'clip form':<10}{'ValueLoss(clip_eps, ...)':<47}{'agreement':<10}"]
    for peer in PEERS.values():
        settings = ", ".join(f"{k}={v!r}" for k, v in peer.valueloss_settings.items()) or "(defaults)"
        if peer.flat:
            settings += " on values[mask]"
        lines.append(f"{peer.name:<19}{peer.clip_form:<10}{settings:<47}{peer.agreement:<10}")
    return "\n".join(lines)


def format_results(results: list[PeerResult], digits: int = 6) -> str:
    """:func:`run_peers` results as aligned text (losses and gradient norms rounded to ``digits``)."""
    lines = [f"{'peer':<19}{'loss':>12}{'|grad|':>12}{'ValueLoss':>12}{'|grad|':>12}  bitwise"]
    for r in results:
        lines.append(
            f"{r.name:<19}{r.loss:>12.{digits}f}{r.grad_norm:>12.{digits}f}{r.valueloss_loss:>12.{digits}f}"
            f"{r.valueloss_grad_norm:>12.{digits}f}  {'yes' if r.bitwise_equal else 'no'}"
        )
    return "\n".join(lines)
