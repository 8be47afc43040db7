"""``ValueLoss``: PPO's (clipped) value-function loss as an ``nn.Module``, a drop-in for OpenRLHF's."""

from __future__ import annotations

from torch import Tensor, nn

from . import functional as F
from ._validate import check_choice
from .functional import Count
from .fused import fused_value_loss
from .record import Recorder


class ValueLoss(nn.Module):
    r"""PPO's value-function loss with optional value clipping; a drop-in for OpenRLHF's ``ValueLoss``.

    Per token, with :math:`v` = ``values``, :math:`v_{old}` = ``old_values``, :math:`R` = ``returns``
    and :math:`\epsilon` = ``clip_eps``:

    .. math::
        v^{clip} = v_{old} + \mathrm{clamp}(v - v_{old}, -\epsilon, \epsilon), \qquad
        \ell = \max\big((v^{clip} - R)^2,\ (v - R)^2\big)

    (``variant="max"``: OpenAI baselines ppo2, OpenRLHF, verl, TRL, CleanRL). With
    ``variant="clipped"``, :math:`\ell = (v^{clip} - R)^2` (Stable-Baselines3). With
    ``clip_eps=None``, :math:`\ell = (v - R)^2`. ``loss_type="huber"`` replaces each :math:`e^2` by
    :math:`2\,\mathrm{huber}_\delta(e)`, so that after the factor 0.5 it is the usual Huber loss.

    The per-token losses are reduced over the tokens of ``action_mask`` (weighted by it, if it is an integer
    or float mask) and the result is multiplied by ``scale`` (0.5, as in ppo2 and OpenRLHF). Reductions
    (``loss_agg_mode``: the five modes of verl's ``agg_loss``, release 0.9.1; :math:`m` the mask, :math:`n_s` the
    unmasked tokens of sequence :math:`s`):

    * ``"token-mean"`` (default, ``token_level_loss=True``): :math:`\sum m\ell / N \cdot dp`;
    * ``"seq-mean-token-mean"`` (``token_level_loss=False``): mean over non-empty sequences of the
      per-sequence token means, :math:`\sum_s (\sum_t m\ell)/n_s / S \cdot dp`;
    * ``"token-sum"``, ``"seq-mean-token-sum"``, ``"seq-mean-token-sum-norm"`` (the last divides by
      ``loss_scale_factor``, default ``T``, as in Dr. GRPO).

    :math:`N` = ``batch_num_tokens`` and :math:`S` = ``global_batch_size`` default to the local counts;
    pass the *global* counts (over data-parallel ranks and gradient-accumulation steps, see
    :mod:`valueloss.distributed`) with ``dp_size`` = the number of ranks, and DDP's gradient
    averaging then yields exactly the full-batch gradient. As in OpenRLHF, ``dp_size > 1`` without
    the count the mode needs raises ``ValueError``. A count of 0 means nothing to average: the loss and
    its gradient are exactly 0. Counts given as numbers are checked (negative, NaN or infinite raise
    ``ValueError``); counts given as tensors are used as they are, since reading them would
    synchronise with the host (on a GPU).

    Differences from OpenRLHF (all on inputs where OpenRLHF gives NaN or fails): an empty mask or
    an empty sequence contributes 0 instead of NaN; NaN/inf at masked-out tokens never reach the
    loss or the gradients; ``action_mask=None`` means every token counts; half-precision inputs are
    accumulated in float32 (the loss is returned in float32); mismatched shapes raise instead of
    broadcasting. ``seq-mean-token-mean`` divides by :math:`n_s` exactly, where OpenRLHF adds
    ``1e-8`` (a relative difference below ``1e-8`` for :math:`n_s \ge 1`).

    Args:
        clip_eps: half-width of the trust band around ``old_values``; ``None`` disables clipping.
            Must be ``>= 0``. It is in the units of the returns: see notebook 05 on reward scale.
        token_level_loss: ``True`` for ``"token-mean"``, ``False`` for ``"seq-mean-token-mean"``
            (OpenRLHF's switch). Ignored when ``loss_agg_mode`` is given and consistent with it.
        variant: ``"max"`` (pessimistic max of both branches) or ``"clipped"`` (only the clipped prediction).
        loss_agg_mode: one of :data:`valueloss.functional.AGGREGATION_MODES`; overrides ``token_level_loss``.
        loss_type: ``"squared"`` or ``"huber"``.
        huber_delta: the Huber threshold :math:`\delta` (> 0) for ``loss_type="huber"``.
        scale: the constant factor in front of the loss (0.5 in ppo2/OpenRLHF/verl, 1.0 in SB3).
        loss_scale_factor: the divisor of ``"seq-mean-token-sum-norm"`` (default ``T``).
        fused: ``False`` (default): the eager formula under autograd, the same at every size. ``True``:
            the loss and its gradient in one compiled pass (:mod:`valueloss.fused`: the same numbers, a fraction
            of the time and memory for large batches; the first call compiles for seconds).
        recorder: a :class:`valueloss.record.Recorder` that saves every N-th batch this loss sees (``None``:
            nothing is recorded). The calls in between cost one integer comparison and no host sync.

    Shape:
        - values: ``(B, T)`` or any ``(..., T)``; new critic predictions (the only input with a gradient).
        - old_values: same shape; the critic's predictions when the batch was collected.
        - returns: same shape; the regression targets (e.g. GAE returns).
        - action_mask: same shape, or ``None`` (every token counts). A bool mask selects the tokens where it is
          True; an integer or float mask weighs each token's loss by its value (the means divide by the sum of
          the weights; a 0/1 mask therefore selects), as OpenRLHF's ``masked_mean`` does.
        - output: scalar, float32 for half-precision inputs, else the inputs' dtype.

    Forward args ``dp_size``, ``batch_num_tokens``, ``global_batch_size`` follow OpenRLHF; the
    keyword ``global_num_tokens`` is accepted as OpenRLHF's alias of ``batch_num_tokens``.

    Example:
        >>> import torch
        >>> from valueloss import ValueLoss
        >>> loss_fn = ValueLoss(clip_eps=0.2)
        >>> values = torch.tensor([[1.0, 2.0, 0.5]], requires_grad=True)
        >>> old_values = torch.tensor([[0.5, 2.0, 0.5]])
        >>> returns = torch.tensor([[2.0, 1.0, 0.5]])
        >>> mask = torch.tensor([[True, True, False]])
        >>> loss = loss_fn(values, old_values, returns, mask)
        >>> round(loss.item(), 4)  # 0.5 * mean(max((0.7-2)^2, (1-2)^2), (2-1)^2)
        0.6725
        >>> loss.backward()
        >>> values.grad  # first token: the clipped branch wins, so its gradient is zero
        tensor([[0.0000, 0.5000, 0.0000]])
    """

    def __init__(
        self,
        clip_eps: float | None = None,
        token_level_loss: bool = True,
        *,
        variant: str = "max",
        loss_agg_mode: str | None = None,
        loss_type: str = "squared",
        huber_delta: float = 1.0,
        scale: float = 0.5,
        loss_scale_factor: float | None = None,
        fused: bool = False,
        recorder: Recorder | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(token_level_loss, bool):
            raise TypeError(f"token_level_loss must be a bool; got {type(token_level_loss).__name__}")
        implied = "token-mean" if token_level_loss else "seq-mean-token-mean"
        if loss_agg_mode is not None and loss_agg_mode != implied and not token_level_loss:
            raise ValueError(
                f"token_level_loss=False means loss_agg_mode='seq-mean-token-mean'; got loss_agg_mode={loss_agg_mode!r}"
            )
        if loss_agg_mode is not None:
            check_choice(loss_agg_mode, F.AGGREGATION_MODES, "loss_agg_mode")
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be True or False; got {type(fused).__name__} {fused!r}")
        self.config = F.LossConfig(
            clip_eps=clip_eps, variant=variant, mode=implied if loss_agg_mode is None else loss_agg_mode,
            loss_type=loss_type, huber_delta=huber_delta, scale=scale, loss_scale_factor=loss_scale_factor,
        )
        self.token_level_loss = token_level_loss
        self.fused = fused
        self.recorder = recorder

    @property
    def recorder(self) -> Recorder | None:
        """The :class:`valueloss.record.Recorder` of this loss, or ``None``; setting it checks the type."""
        return self._recorder

    @recorder.setter
    def recorder(self, value: Recorder | None) -> None:
        if value is not None and not callable(value):  # duck-typed: a doctest may load record.py a second time
            raise TypeError(f"recorder must be a valueloss.record.Recorder (or a callable taking values, old_values, "
                            f"returns, action_mask, config=) or None; got {type(value).__name__}")
        self._recorder = value

    @property
    def clip_eps(self) -> float | None:
        """The clip range (OpenRLHF's attribute); setting it checks the new value."""
        return self.config.clip_eps

    @clip_eps.setter
    def clip_eps(self, value: float | None) -> None:
        self.config = self.config.replace(clip_eps=value)

    @property
    def loss_agg_mode(self) -> str:
        """The aggregation mode (``config.mode``)."""
        return self.config.mode

    def forward(
        self,
        values: Tensor,
        old_values: Tensor,
        returns: Tensor,
        action_mask: Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: Count = None,
        global_batch_size: Count = None,
        *,
        global_num_tokens: Count = None,
    ) -> Tensor:
        loss = (fused_value_loss if self.fused else F.value_loss)(
            values,
            old_values,
            returns,
            action_mask,
            self.config,
            dp_size=dp_size,
            batch_num_tokens=batch_num_tokens if batch_num_tokens is not None else global_num_tokens,
            global_batch_size=global_batch_size,
        )
        if self._recorder is not None:
            self._recorder(values, old_values, returns, action_mask, config=self.config)
        return loss

    def extra_repr(self) -> str:
        defaults = F.LossConfig()
        parts = [f"clip_eps={self.clip_eps}", f"loss_agg_mode={self.loss_agg_mode!r}"]
        for name in ("variant", "loss_type", "huber_delta", "scale", "loss_scale_factor"):
            if getattr(self.config, name) != getattr(defaults, name):
                parts.append(f"{name}={getattr(self.config, name)!r}")
        if self.fused:
            parts.append("fused=True")
        if self._recorder is not None:
            parts.append(f"recorder={self._recorder!r}")
        return ", ".join(parts)
