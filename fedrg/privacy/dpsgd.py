"""Opacus DP-SGD for the local loop: the ``privacy`` seam of :func:`fedrg.train.loop.train_local`.

The loop keeps its own model and optimizer; when it is given a :class:`DPSession` it hands
both over once and from then on only asks the session for batches and steps::

    session.attach(model, optimizer)            # wraps with Opacus, loads the history
    try:
        for batch in session.batches(train_dataset, steps=steps):
            loss = session.step(batch)          # forward, clipped backward, noisy step
    finally:
        history = session.cleanup()             # hooks off, updated PrivacyHistory out

What the session guarantees (each point is tested in ``tests/test_privacy_dpsgd*.py``):

* **Poisson sampling**: every step includes each training record independently with
  probability ``sample_rate`` (Opacus' ``UniformWithReplacementSampler``), so batch sizes
  vary. An empty draw becomes a *noise-only* step: the optimizer adds
  ``N(0, (noise_multiplier * max_grad_norm)^2)`` and the accountant counts the step.
* **Per-sample clipping** to ``max_grad_norm`` and Gaussian noise by Opacus' ``DPOptimizer``,
  with ``loss_reduction="mean"`` over the *expected* batch size (not the drawn one, which
  would leak the batch size). Logical batches larger than ``max_physical_batch_size`` are
  split into physical chunks whose clipped gradients are summed before one noisy step.
* ``grad_sample_mode`` ``hooks``, ``functorch``, ``ew``, ``ghost`` or ``bk``. In ghost mode
  the backward pass runs through Opacus' criterion wrapper (``DPLossFastGradientClipping``):
  calling ``backward()`` on the plain loss would skip clipping without any error. ``bk``
  (book-keeping, :mod:`fedrg.privacy.bookkeeping`) runs one backward pass with the
  parameters detached, computes per-example norms from the layers' inputs and output
  gradients (ghost norms where cheaper) and writes the clipped sums to ``p.grad`` for Opacus'
  ghost-clipping optimizer, which adds the noise and calls the accountant.
* **Accounting**: the accountant's history is loaded from the dataset's persisted
  :class:`~fedrg.privacy.accounting.PrivacyHistory` and only appended to; the updated
  history comes back from :meth:`DPSession.cleanup` (and :attr:`DPSession.history`).
* **Noise and sampling randomness** come from OS entropy unless a ``seed`` is given
  explicitly (tests) or a test selects seeded noise for a whole block of code with
  :func:`use_seeded_noise_for_tests` (a Python-level switch: no setting, file, environment
  variable or server message can reach it). The federation's ``training.seed`` is known to
  the server and must never seed the noise: whoever can regenerate the noise can subtract it.
* :meth:`DPSession.cleanup` removes Opacus' hooks and attributes, so a fresh session can wrap
  the same model next round ("Trying to add hooks twice" otherwise). The caller keeps and
  saves its own (unwrapped) model; :attr:`DPSession.module` is that module, never the wrapper.
"""

from __future__ import annotations

import hashlib
import inspect
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from opacus.accountants import create_accountant
from opacus.grad_sample import AbstractGradSampleModule, prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn

from fedrg.errors import PrivacyError
from fedrg.privacy.accounting import PrivacyHistory, epsilon_of
from fedrg.privacy.bookkeeping import BookKeeper
from fedrg.privacy.torch_internals import conv_grad_samples_by_unfold

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost", "bk")

Batch = Mapping[str, Any]


class PerExampleLoss(nn.Module):
    """Identity "criterion" over per-example losses, as Opacus' ghost wrapper expects.

    The model already returns one loss per example (``Tensor[B]``); the wrapper switches
    ``reduction`` to ``"none"`` for the first pass and reduces itself.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        if self.reduction == "none":
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()


def batch_size_of(batch: Batch) -> int:
    """Number of records in a collated batch (0 for an empty batch or ``{}``)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    for value in batch.values():
        if isinstance(value, (list, tuple)):
            return len(value)
    return 0


def slice_batch(batch: Batch, start: int, stop: int) -> dict[str, Any]:
    """Records ``start:stop`` of a collated batch (tensors and lists sliced on dim 0)."""
    n = batch_size_of(batch)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        batched = (isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n) or (
            isinstance(value, (list, tuple)) and len(value) == n
        )
        out[key] = value[start:stop] if batched else value
    return out


def _collate_for(dataset: Any) -> Callable[[list[Any]], Batch]:
    """The dataset's own ``collate`` (fedrg cohort datasets have one), else torch's default."""
    own = getattr(dataset, "collate", None)
    if callable(own):
        collate: Callable[[list[Any]], Batch] = own
        return collate
    from torch.utils.data import default_collate

    return default_collate


_TEST_NOISE = threading.local()


@contextmanager
def use_seeded_noise_for_tests(seed: int) -> Iterator[None]:
    """Inside the block, sessions created without a ``seed`` draw noise and Poisson samples
    from seeded generators: the k-th such session gets a seed derived from ``(seed, k)``.

    For tests and benchmarks only: it makes a whole training run (e.g. an in-process
    federation) repeatable, so a learning test can neither pass nor fail by luck. Nothing
    outside the calling Python code can turn it on (no config key, environment variable or
    message), and it applies to the calling thread only. Never use it where privacy matters:
    whoever knows the seed can regenerate and subtract the noise.

    Parameters
    ----------
    seed
        Base seed of the block.
    """
    previous = getattr(_TEST_NOISE, "state", None)
    _TEST_NOISE.state = [int(seed), 0]
    try:
        yield
    finally:
        _TEST_NOISE.state = previous


_KEYED_TEST_NOISE: list[int] = []  # [seed] once a test's worker hook selected it


def seed_noise_by_key_for_tests(seed: int) -> None:
    """From now on, in this whole process, :func:`keyed_test_noise_seed` derives each
    session's noise seed from ``(seed, key)``.

    For tests only, in processes a test owns: a simulation's Ray workers (a test's Ray
    ``worker_process_setup_hook`` calls it), where which worker answers which hospital
    changes from run to run, so the k-th-session sequence of
    :func:`use_seeded_noise_for_tests` would not repeat. With a key such as
    ``"hospital-2/round-1"`` the noise repeats whichever process or Ray node trains it.
    Like :func:`use_seeded_noise_for_tests`, only Python code running in the process can
    select it (no config key, environment variable or message); whoever knows the seed can
    regenerate and subtract the noise.

    Parameters
    ----------
    seed
        Base seed of every keyed session in this process.
    """
    _KEYED_TEST_NOISE[:] = [int(seed)]


def keyed_test_noise_seed(key: str) -> int | None:
    """The session seed for ``key`` once :func:`seed_noise_by_key_for_tests` ran in this
    process; ``None`` (OS entropy) otherwise, which is always the case outside tests."""
    if not _KEYED_TEST_NOISE:
        return None
    digest = hashlib.sha256(f"fedrg-test-noise/{_KEYED_TEST_NOISE[0]}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def _first_forward_argument(model: nn.Module) -> str:
    """The name of ``model.forward``'s first parameter: Opacus' ``ew`` wrapper
    (``GradSampleModuleExpandedWeights``) takes it positionally and reads the batch size
    from its first dimension."""
    params = list(inspect.signature(model.forward).parameters.values())
    if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise PrivacyError(
            f"grad_sample_mode='ew' needs a model whose forward takes a batch tensor as its first "
            f"argument; {type(model).__name__}.forward{inspect.signature(model.forward)} does not "
            "(use grad_sample_mode='hooks')")
    return params[0].name


def _entropy_seed() -> int:
    """OS entropy, unless a test selected seeded noise (:func:`use_seeded_noise_for_tests`)."""
    state = getattr(_TEST_NOISE, "state", None)
    if state is None:
        return secrets.randbits(63)
    state[1] += 1
    digest = hashlib.sha256(f"fedrg-test-noise/{state[0]}/{state[1]}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


REPORT_PARTS = ("lora_", "image_proj.", "genomics_proj.")


def report_clip_groups(privacy_cfg: Any) -> list[tuple[tuple[str, ...], float]]:
    """``privacy.report_clip_share`` as :class:`DPSession` ``clip_groups``: the report side
    (LoRA and the prompt projectors) against everything else; ``[]`` (flat) for share 0."""
    share = float(getattr(privacy_cfg, "report_clip_share", 0.0) or 0.0)
    return [(REPORT_PARTS, share)] if share > 0 else []


class MechanismPlan(Protocol):
    """What :meth:`DPSession.for_plan` reads from a plan (:class:`fedrg.hospital.plan.RoundPlan`)."""

    @property
    def noise_multiplier_added(self) -> float: ...
    @property
    def max_grad_norm(self) -> float: ...
    @property
    def sample_rate(self) -> float: ...
    @property
    def steps(self) -> int: ...
    @property
    def accountant(self) -> str: ...
    @property
    def n_train(self) -> int: ...
    @property
    def lifetime_history(self) -> PrivacyHistory: ...
    @property
    def expected_batch_size(self) -> float: ...


class DPSession:
    """DP-SGD state of one hospital for one round (see the module docstring).

    Parameters
    ----------
    noise_multiplier
        Sigma, calibrated once for the whole planned federation
        (:func:`fedrg.privacy.accounting.calibrate_noise_multiplier`).
    max_grad_norm
        Per-sample L2 clipping bound C.
    sample_rate
        Poisson sample rate q (expected batch size / training records).
    expected_batch_size
        Divisor of the summed clipped gradients (``loss_reduction="mean"``).
    grad_sample_mode
        Opacus mode: ``hooks``, ``functorch``, ``ew`` or ``ghost``; or ``bk``
        (book-keeping clipping, :mod:`fedrg.privacy.bookkeeping`, with Opacus' optimizer).
    accountant
        Opacus accountant name (``rdp``, ``prv``, ``gdp``).
    history
        The dataset's history so far (never reset; ``None`` = fresh dataset).
    max_physical_batch_size
        Largest chunk run through forward/backward at once (``None`` = no limit).
    n_records
        Expected ``len(dataset)``; checked in :meth:`batches` if given.
    steps_per_round
        Default number of steps for :meth:`batches`.
    seed
        Seed for the Poisson sampler and the noise. ``None`` (the default): OS entropy
        (or, inside :func:`use_seeded_noise_for_tests`, the test's seeded sequence).
        Only tests and benchmarks should pass one.
    collate_fn
        Turns a list of dataset items into a batch (default: ``collate_samples`` for
        fedrg cohort datasets, else ``torch.utils.data.default_collate``).
    clip_groups
        Group-wise clipping (:mod:`fedrg.privacy.fused`): ``[(name parts, share), ...]``;
        a parameter whose name contains one of a group's parts is clipped, per example, to
        ``max_grad_norm * sqrt(share)``, the rest to ``max_grad_norm * sqrt(1 - sum of
        shares)``. The sensitivity stays ``max_grad_norm``. Empty (default): flat clipping.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        expected_batch_size: float,
        grad_sample_mode: str = "hooks",
        accountant: str = "rdp",
        history: PrivacyHistory | None = None,
        max_physical_batch_size: int | None = None,
        n_records: int | None = None,
        steps_per_round: int | None = None,
        seed: int | None = None,
        collate_fn: Callable[[list[Any]], Batch] | None = None,
        clip_groups: Sequence[tuple[Sequence[str], float]] = (),
    ) -> None:
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise PrivacyError(
                f"privacy.grad_sample_mode={grad_sample_mode!r} is not supported; use one of "
                f"{', '.join(GRAD_SAMPLE_MODES)}"
            )
        if noise_multiplier < 0 or max_grad_norm <= 0:
            raise PrivacyError(
                f"noise_multiplier={noise_multiplier} must be >= 0 and privacy.max_grad_norm="
                f"{max_grad_norm} > 0"
            )
        if not (0.0 < sample_rate <= 1.0):
            raise PrivacyError(f"sample_rate={sample_rate} must lie in (0, 1]")
        if expected_batch_size <= 0:
            raise PrivacyError(f"expected_batch_size={expected_batch_size} must be > 0")
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.sample_rate = float(sample_rate)
        self.expected_batch_size = float(expected_batch_size)
        self.grad_sample_mode = grad_sample_mode
        self.accountant_name = accountant
        self.max_physical_batch_size = max_physical_batch_size
        self.n_records = n_records
        self.steps_per_round = steps_per_round
        seed = _entropy_seed() if seed is None else int(seed)
        self._sampling_generator = torch.Generator().manual_seed(seed)
        self._noise_generator = torch.Generator().manual_seed((seed * 2654435761 + 1) % 2**63)
        self._collate = collate_fn
        shares = [float(share) for _, share in clip_groups]
        if clip_groups and (any(not 0.0 < x < 1.0 for x in shares) or sum(shares) >= 1.0):
            raise PrivacyError(
                f"clip group shares {shares} must each lie in (0, 1) and sum to less than 1 "
                "(the rest of the squared clipping norm goes to the remaining parameters); "
                "e.g. privacy.report_clip_share=0.25")
        if clip_groups and grad_sample_mode == "ghost":
            raise PrivacyError("group-wise clipping (privacy.report_clip_share > 0) is not "
                               "available in grad_sample_mode='ghost'; use 'ew' or set the share to 0")
        self.clip_groups = [(tuple(prefixes), float(share)) for prefixes, share in clip_groups]
        self._initial_history = history if history is not None else PrivacyHistory()
        self.accountant = create_accountant(mechanism=accountant)
        if self._initial_history.total_steps:
            self.accountant.load_state_dict(self._initial_history.to_state_dict(accountant))
        self._model: nn.Module | None = None
        self._gsm: AbstractGradSampleModule | None = None  # Opacus' wrapper of _model
        self._keeper: BookKeeper | None = None  # bk mode: the book-keeping of _model
        self._bk_groups: dict[str, Any] = {}  # bk mode: group-wise clipping layout
        self._ew_first_argument = ""  # ew mode: the forward argument given positionally
        self.optimizer: Any = None  # Opacus' DPOptimizer (opacus is untyped)
        self._criterion: DPLossFastGradientClipping | None = None
        self._checked_params = False
        self.noise_only_steps = 0
        self.steps_taken = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_plan(
        cls,
        plan: MechanismPlan,
        *,
        privacy_cfg: Any,
        training_cfg: Any,
        seed: int | None = None,
        collate_fn: Callable[[list[Any]], Batch] | None = None,
    ) -> DPSession:
        """The session of one planned round: every privacy number from ``plan``.

        ``plan`` is a hospital's :class:`fedrg.hospital.plan.RoundPlan` (or anything with the
        same attributes): the noise this site adds (all of it with local noise, its share with
        distributed noise), clipping norm, sample rate, expected batch size, steps,
        accountant, the dataset's history and its size. From the configs only how to compute
        (``grad_sample_mode``, physical batch size, group-wise clipping shares).
        """
        return cls(
            noise_multiplier=plan.noise_multiplier_added,
            max_grad_norm=plan.max_grad_norm,
            sample_rate=plan.sample_rate,
            expected_batch_size=plan.expected_batch_size,
            grad_sample_mode=privacy_cfg.grad_sample_mode,
            accountant=plan.accountant,
            history=plan.lifetime_history,
            max_physical_batch_size=training_cfg.max_physical_batch_size,
            n_records=plan.n_train,
            steps_per_round=plan.steps,
            seed=seed,
            collate_fn=collate_fn,
            clip_groups=report_clip_groups(privacy_cfg),
        )

    # ------------------------------------------------------------------ wiring
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Wrap ``model`` (per-sample gradients) and ``optimizer`` (clip + noise + account).

        ``optimizer`` must hold exactly the model's trainable parameters. The model's
        ``forward(**tensors)`` must return one loss per example (``Tensor[B]``); if the model
        has ``encode_batch(batch) -> dict[str, Tensor]`` it turns a batch into those tensors.
        """
        if self._gsm is not None or self._keeper is not None:
            raise PrivacyError("DPSession.attach called twice; call cleanup() first")
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise PrivacyError(
                "the model cannot be trained with Opacus DP-SGD: "
                + "; ".join(str(e) for e in errors)
                + " (replace BatchNorm by GroupNorm, e.g. opacus.validators.ModuleValidator.fix)"
            )
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not in_opt or not in_opt <= trainable:
            raise PrivacyError(
                "the optimizer must hold the model's trainable parameters only "
                f"({len(in_opt)} in the optimizer, {len(trainable)} trainable in the model)"
            )
        if self.grad_sample_mode == "ew":
            self._ew_first_argument = _first_forward_argument(model)
        if self.grad_sample_mode == "bk":
            self._attach_bookkeeping(model, optimizer)
            return
        kwargs: dict[str, Any] = {"batch_first": True, "loss_reduction": "mean"}
        if self.grad_sample_mode == "ghost":
            kwargs["max_grad_norm"] = self.max_grad_norm
        gsm = prepare_module(model, self.grad_sample_mode, True, **kwargs)
        if self.grad_sample_mode == "ghost":
            optim_cls = get_optimizer_class(clipping="flat", distributed=False,
                                            grad_sample_mode=self.grad_sample_mode)
        else:  # Opacus' DPOptimizer with its per-tensor loops fused (same clipping and noise)
            from fedrg.privacy.fused import FusedDPOptimizer

            optim_cls = FusedDPOptimizer
            if self.clip_groups:
                kwargs_groups = self._group_layout(model, optimizer)
        dp_opt = optim_cls(
            optimizer=optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=self._noise_generator,
            secure_mode=False,
            **(kwargs_groups if self.clip_groups and self.grad_sample_mode != "ghost" else {}),
        )
        dp_opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        if self.grad_sample_mode == "ghost":
            self._criterion = DPLossFastGradientClipping(gsm, dp_opt, PerExampleLoss("mean"), "mean")
        self._model, self._gsm, self.optimizer = model, gsm, dp_opt

    def _attach_bookkeeping(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """bk mode: no Opacus wrapper; Opacus' ghost-clipping optimizer contract (``p.grad`` =
        sum of the clipped per-example gradients; :class:`~fedrg.privacy.fused.
        FusedClippedSumDPOptimizer`) adds Opacus' noise, scales and counts the step."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        keeper = BookKeeper(model, params)
        self._bk_groups = self._group_layout(model, optimizer) if self.clip_groups else {}
        from fedrg.privacy.fused import FusedClippedSumDPOptimizer

        dp_opt = FusedClippedSumDPOptimizer(
            optimizer=optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=self._noise_generator,
            secure_mode=False,
        )
        dp_opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        self._model, self._keeper, self.optimizer = model, keeper, dp_opt

    def _group_layout(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Group index of every optimizer parameter (the first group with a name part found
        in the parameter's name; the rest form the last group) and each group's bound
        ``C * sqrt(share)``."""
        names = {id(p): n for n, p in model.named_parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        rest = len(self.clip_groups)
        groups = []
        for p in params:
            name = names.get(id(p), "")
            hit = [k for k, (parts, _) in enumerate(self.clip_groups)
                   if any(x in name for x in parts)]
            groups.append(hit[0] if hit else rest)
        shares = [s for _, s in self.clip_groups] + [1.0 - sum(s for _, s in self.clip_groups)]
        used = sorted(set(groups))
        if used != list(range(len(shares))):
            missing = [self.clip_groups[k][0] if k < rest else "(the rest)"
                       for k in range(len(shares)) if k not in used]
            raise PrivacyError(f"group-wise clipping: no trainable parameter in group(s) {missing}; "
                               "set privacy.report_clip_share=0 for flat clipping")
        norms = [self.max_grad_norm * s ** 0.5 for s in shares]
        return {"clip_groups": groups, "group_max_norms": norms}

    @property
    def module(self) -> nn.Module:
        """The caller's own model (never the Opacus wrapper): save this one."""
        if self._model is None:
            raise PrivacyError("DPSession has no model; call attach(model, optimizer) first")
        return self._model

    @property
    def history(self) -> PrivacyHistory:
        """The dataset's whole history, including this session's steps."""
        return PrivacyHistory.from_opacus(self.accountant.history)

    def epsilon(self, *, target_delta: float) -> float:
        """Epsilon spent by the whole history so far."""
        return epsilon_of(self.history, target_delta=target_delta, accountant=self.accountant_name)

    def cleanup(self) -> PrivacyHistory:
        """Remove Opacus hooks and attributes from the model; return the updated history."""
        if self._gsm is not None and self._model is not None:
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            self._gsm._close()
            for p in self._model.parameters():
                for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)
            self._gsm = None
        if self._keeper is not None:
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            self._keeper.close()
            self._keeper = None
        self._criterion = None
        return self.history

    def __enter__(self) -> DPSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ data
    def batches(self, dataset: Any, *, steps: int | None = None) -> Iterator[Batch]:
        """Poisson batches: each record joins each step with probability ``sample_rate``.

        Yields ``steps`` collated batches. An empty draw yields ``dataset.empty_batch()``
        (or ``{}`` if the dataset has none); :meth:`step` turns it into a noise-only step.
        """
        n = len(dataset)
        if self.n_records is not None and n != self.n_records:
            raise PrivacyError(
                f"the DP session was planned for {self.n_records} training records but the "
                f"dataset has {n}; rebuild the session from the dataset's length"
            )
        steps = self.steps_per_round if steps is None else steps
        if steps is None:
            raise PrivacyError("DPSession.batches needs steps= (or a session from_config)")
        sampler = UniformWithReplacementSampler(
            num_samples=n, sample_rate=self.sample_rate, generator=self._sampling_generator,
            steps=int(steps),
        )
        collate = self._collate or _collate_for(dataset)
        for indices in sampler:
            if len(indices) == 0:
                empty = getattr(dataset, "empty_batch", None)
                yield empty() if callable(empty) else {}
            else:
                yield collate([dataset[int(i)] for i in indices])

    # ------------------------------------------------------------------ steps
    def step(self, batch: Batch) -> float | None:
        """One DP-SGD step on a (Poisson) batch; returns its mean loss (``None`` if empty)."""
        if self._gsm is None and self._keeper is None:
            raise PrivacyError("DPSession.step called before attach(model, optimizer)")
        n = batch_size_of(batch)
        self.steps_taken += 1
        if n == 0:
            self._noise_only_step()
            return None
        chunk = self.max_physical_batch_size or n
        total = 0.0
        starts = list(range(0, n, chunk))
        for k, start in enumerate(starts):
            part = slice_batch(batch, start, min(start + chunk, n)) if len(starts) > 1 else batch
            total += self._backward(part) * batch_size_of(part)
            if k < len(starts) - 1:
                # sum this chunk's clipped gradients, no noise, no accounting yet
                self.optimizer.signal_skip_step(do_skip=True)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / n

    def _tensors(self, batch: Batch) -> dict[str, torch.Tensor]:
        encode = getattr(self._model, "encode_batch", None)
        if callable(encode):
            return dict(encode(batch))
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def _backward(self, batch: Batch) -> float:
        if self._keeper is not None:
            return self._bookkeeping_backward(self._keeper, batch)
        gsm = self._gsm
        if gsm is None:
            raise PrivacyError("DPSession.step called before attach(model, optimizer)")
        tensors = self._tensors(batch)
        if self.grad_sample_mode != "ew":
            return self._finish_backward(gsm(**tensors))
        # Opacus' expanded-weights wrapper takes the batch size from its first positional
        # argument; convolutions unfold at every batch size (fedrg.privacy.torch_internals)
        first = tensors.pop(self._ew_first_argument, None)
        if first is None or first.dim() < 1 or first.shape[0] != batch_size_of(batch):
            raise PrivacyError(
                f"grad_sample_mode='ew': the model's first forward argument "
                f"{self._ew_first_argument!r} must be a tensor of {batch_size_of(batch)} "
                "examples (dim 0) from encode_batch; use grad_sample_mode='hooks' otherwise")
        with conv_grad_samples_by_unfold():
            return self._finish_backward(gsm(first, **tensors))

    def _bookkeeping_backward(self, keeper: BookKeeper, batch: Batch) -> float:
        """bk mode: one forward with the parameters detached, one backward of the summed
        per-example losses, then the clipped sums into ``p.grad`` (no noise yet)."""
        tensors = self._tensors(batch)
        with keeper.capture():
            losses = self.module(**tensors)
        if losses.dim() != 1:
            raise PrivacyError(
                f"the model must return one loss per example (shape [B]); got {tuple(losses.shape)}"
            )
        if losses.requires_grad:
            torch.autograd.backward(losses.sum())  # per-example gradients, unscaled
            unused = keeper.unused_layers()
        else:
            unused = [layer.name for layer in keeper.layers]
        if unused:
            shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
            raise PrivacyError(
                f"{len(unused)} trainable layer(s) got no per-sample gradient ({shown}); "
                "every trainable parameter must be used by every forward: freeze the unused ones"
            )
        keeper.clip_into_grads(n=int(losses.shape[0]), max_grad_norm=self.max_grad_norm,
                               **self._bk_groups)
        return float(losses.detach().mean())

    def _finish_backward(self, losses: torch.Tensor) -> float:
        if losses.dim() != 1:
            raise PrivacyError(
                f"the model must return one loss per example (shape [B]); got {tuple(losses.shape)}"
            )
        if self._criterion is not None:
            # ghost clipping: backward MUST go through Opacus' wrapper, else no clipping
            try:
                self._criterion(losses).backward()
            except AttributeError as err:
                if "_norm_sample" not in str(err):
                    raise
                self._raise_unused("_norm_sample")
        else:
            torch.autograd.backward(losses.mean())
        if not self._checked_params:
            self._check_all_params_used()
        return float(losses.detach().mean())

    def _check_all_params_used(self) -> None:
        attr = "grad" if self.grad_sample_mode == "ghost" else "grad_sample"
        self._raise_unused(attr)
        self._checked_params = True

    def _raise_unused(self, attr: str) -> None:
        missing = [name for name, p in self.module.named_parameters()
                   if p.requires_grad and getattr(p, attr, None) is None]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise PrivacyError(
                f"{len(missing)} trainable parameter(s) got no per-sample gradient ({shown}); "
                "every trainable parameter must be used by every forward: freeze the unused ones"
            )

    def _noise_only_step(self) -> None:
        """Empty Poisson draw: add noise to a zero gradient and let the accountant count it."""
        for p in self.optimizer.params:
            if self.grad_sample_mode in ("ghost", "bk"):
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.noise_only_steps += 1
