"""BAMEAdamW / BAMESGD under the Hugging Face ``transformers.Trainer`` (the recipe of
``docs/hf_trainer.md``): a tiny ViT built from its config (no Hub download) trained on CPU
with ``optimizers=(opt, scheduler)``, the N:M guarantee at the end, resuming from a
``checkpoint-*`` folder, the optimizer-step count of an epoch-based run, and the
``total_steps`` mistakes that ``finalize_masks()`` repairs."""

from __future__ import annotations

import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from bame_optim import BAMESGD, BAMEAdamW, nm_param_groups
from bame_optim.core.nm import is_nm_sparse, param_to_blocks

transformers = pytest.importorskip(
    "transformers",
    reason="transformers is not installed (pip install 'bame_optim[transformers]')",
)
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
from transformers import (  # noqa: E402
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from bame_apps.integrations.accelerate import MaskSync  # noqa: E402

N, M = 2, 4
MAX_STEPS = 12
SAVE_STEPS = 6
BATCH = 4
NUM_EXAMPLES = 32

Optimizer = BAMEAdamW | BAMESGD
SHORT_SCHEDULE = pytest.mark.filterwarnings("ignore:.*the evolve window:UserWarning")
"""For runs of 5 or 6 steps, whose evolve window is too short for BAME (the optimizer says so)."""

OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "adamw": lambda groups, **kw: BAMEAdamW(groups, lr=1e-2, **kw),
    "sgd": lambda groups, **kw: BAMESGD(groups, lr=0.05, momentum=0.9, **kw),
}


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    """A 1-layer ViT on 8x8 one-channel images, built from its config (no download)."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )
    return ViTForImageClassification(config)


def tiny_dataset(count: int = NUM_EXAMPLES) -> list[dict[str, Any]]:
    """``count`` seeded examples ``{"pixel_values": [1, 8, 8], "labels": int}`` in memory."""
    gen = torch.Generator().manual_seed(1)
    return [
        {
            "pixel_values": torch.randn(1, 8, 8, generator=gen),
            "labels": int(torch.randint(0, 3, (), generator=gen)),
        }
        for _ in range(count)
    ]


def training_args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    """CPU, no reporting, no logging, no worker processes; ``MAX_STEPS`` steps with a
    checkpoint every ``SAVE_STEPS``."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir), max_steps=MAX_STEPS, save_steps=SAVE_STEPS,
        per_device_train_batch_size=BATCH, seed=0, use_cpu=True, report_to=[],
        logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )
    return TrainingArguments(**(kwargs | overrides))


def from_checkpoint(folder: Path) -> ViTForImageClassification:
    """The model saved in ``folder``, through ``from_pretrained`` (a local folder), which maps
    the key names ``save_pretrained`` wrote back to the model's own."""
    return ViTForImageClassification.from_pretrained(str(folder))


def build(
    method: str, args: TrainingArguments, *, model: ViTForImageClassification | None = None,
    total_steps: int | None = None, dataset: list[dict[str, Any]] | None = None,
) -> tuple[Trainer, Optimizer]:
    """The recipe: N:M param groups of ``model`` (default :func:`tiny_vit`), the optimizer with
    ``total_steps`` (default ``args.max_steps``), a cosine schedule with warm-up, and the
    Trainer."""
    model = tiny_vit() if model is None else model
    total = args.max_steps if total_steps is None else total_steps
    opt = OPTIMIZERS[method](nm_param_groups(model, N, M), total_steps=total, delta_t=1)
    scheduler = transformers.get_cosine_schedule_with_warmup(
        opt, num_warmup_steps=2, num_training_steps=args.max_steps
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=tiny_dataset() if dataset is None else dataset,
        optimizers=(opt, scheduler),
    )
    return trainer, opt


def trainer_optimizer_steps(args: TrainingArguments, num_examples: int) -> int:
    """The number of optimizer steps ``Trainer.train()`` runs (docs/hf_trainer.md): ``max_steps``
    when set, else ``ceil(epochs * ceil(batches per process / accumulation))``."""
    if args.max_steps > 0:
        return args.max_steps
    per_process = args.per_device_train_batch_size * args.world_size
    batches = (num_examples // per_process if args.dataloader_drop_last
               else math.ceil(num_examples / per_process))
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def sparse_rows(opt: Optimizer) -> list[dict[str, Any]]:
    """The rows of ``opt.sparsity_report()`` for the sparse parameters."""
    return [row for row in opt.sparsity_report() if row["sparse"]]


def masks(opt: Optimizer) -> dict[str, Tensor]:
    """Each sparse parameter's kept mask by name (a copy)."""
    return {
        name: opt.kept_mask(p).clone()
        for group in opt.param_groups if group["sparse"]
        for name, p in zip(group["param_names"], group["params"], strict=True)
    }


def assert_masks_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    """The same (non-empty) set of names, with equal masks."""
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_same_optimizer_state(a: Optimizer, b: Optimizer) -> None:
    """Equal state dicts: the groups' settings and counters, every state entry bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index, state in sa["state"].items():
        assert state.keys() == sb["state"][index].keys()
        for key, value in state.items():
            other = sb["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, Tensor) else value == other, key


def saved_weights_nm(folder: Path, names: list[str]) -> bool:
    """Whether every named weight of the model saved in ``folder`` is N:M."""
    params = dict(from_checkpoint(folder).named_parameters())
    return all(is_nm_sparse(params[name].detach(), N, M) for name in names)


class Recorder(TrainerCallback):
    """Records, at ``on_train_begin`` (after a resume has loaded the model and the optimizer),
    the step counters, masks, sparse weights and their ``nm_valid``; ``nm_valid`` after the
    first optimizer step of this ``train()`` call; and the masks at each ``on_save``."""

    def __init__(self, opt: Optimizer) -> None:
        self.opt = opt
        self.begin_masks: dict[str, Tensor] = {}
        self.begin_steps: list[int] = []
        self.begin_valid: list[bool] = []
        self.begin_weights: dict[str, Tensor] = {}
        self.first_step_valid: list[bool] | None = None
        self.saved_masks: dict[int, dict[str, Tensor]] = {}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.begin_masks = masks(self.opt) if self.opt.state else {}
        self.begin_steps = [group["step"] for group in self.opt.param_groups]
        self.begin_valid = [row["nm_valid"] for row in sparse_rows(self.opt)]
        self.begin_weights = {
            name: p.detach().clone()
            for group in self.opt.param_groups if group["sparse"]
            for name, p in zip(group["param_names"], group["params"], strict=True)
        }

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self.first_step_valid is None:
            self.first_step_valid = [row["nm_valid"] for row in sparse_rows(self.opt)]

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.saved_masks[state.global_step] = masks(self.opt)


class VerifyMasks(TrainerCallback):
    """The recipe's optional check that every rank holds the same masks:
    :class:`bame_apps.integrations.accelerate.MaskSync` after every optimizer step."""

    def __init__(self, trainer: Trainer, opt: Optimizer) -> None:
        self.sync = MaskSync(opt, trainer.accelerator)
        self.results: list[bool | None] = []

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.results.append(self.sync.after_step())


@pytest.mark.parametrize("method", sorted(OPTIMIZERS))
def test_trainer_trains_to_an_nm_model(tmp_path, method):
    trainer, opt = build(method, training_args(tmp_path))
    verify = VerifyMasks(trainer, opt)
    trainer.add_callback(verify)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ran past total_steps", category=UserWarning)
        output = trainer.train()

    assert math.isfinite(output.training_loss)
    # Mask updates at t = 0..7 (gradual to t_i = 4, evolve to t_f = 8), then the frozen phase
    # every delta_t = 1 steps: checked on one process at every step.
    assert verify.results == [True] * 12
    assert trainer.state.global_step == MAX_STEPS
    assert [group["step"] for group in opt.param_groups] == [MAX_STEPS] * len(opt.param_groups)
    rows = sparse_rows(opt)
    assert len(rows) == 6  # q, k, v, o projections and the two MLP layers (stem, head dense)
    assert all(row["nm_valid"] for row in rows), rows
    assert all(row["density"] == N / M and row["phase"] == "frozen" for row in rows)
    # The optimizer trains the Trainer's model in place, and the last checkpoint is N:M.
    model_params = dict(trainer.model.named_parameters())
    for group in opt.param_groups:
        for name, p in zip(group["param_names"], group["params"], strict=True):
            assert model_params[name] is p
    names = [row["name"] for row in rows]
    assert saved_weights_nm(tmp_path / f"checkpoint-{MAX_STEPS}", names)


@pytest.mark.parametrize("method", sorted(OPTIMIZERS))
def test_resume_from_checkpoint_matches_the_uninterrupted_run(tmp_path, method):
    # One uninterrupted run, with checkpoint-6 along the way.
    full_trainer, full_opt = build(method, training_args(tmp_path / "full"))
    full_recorder = Recorder(full_opt)
    full_trainer.add_callback(full_recorder)
    full_trainer.train()

    # A new model loaded from the checkpoint, optimizer, scheduler and Trainer resume from it.
    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_STEPS}"
    trainer, opt = build(method, training_args(tmp_path / "resumed"),
                         model=from_checkpoint(checkpoint))
    recorder = Recorder(opt)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=str(checkpoint))

    # load_state_dict restored the schedule and the masks saved at step 6.
    assert recorder.begin_steps == [SAVE_STEPS] * len(opt.param_groups)
    assert_masks_equal(recorder.begin_masks, full_recorder.saved_masks[SAVE_STEPS])
    assert all(recorder.begin_valid) and all(recorder.first_step_valid)
    # ... and the run ends exactly where the uninterrupted one did: the same data order, the
    # same masks, bit-identical weights.
    assert [group["step"] for group in opt.param_groups] == [MAX_STEPS] * len(opt.param_groups)
    assert_masks_equal(masks(opt), masks(full_opt))
    assert_same_optimizer_state(opt, full_opt)
    full_params = dict(full_trainer.model.named_parameters())
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, full_params[name]), name
    assert all(row["nm_valid"] for row in sparse_rows(opt))


def _first_run(tmp_path: Path) -> tuple[Path, dict[str, Tensor]]:
    """Train ``SAVE_STEPS`` steps with BAMEAdamW; the checkpoint and its masks."""
    trainer, opt = build("adamw", training_args(tmp_path / "first", max_steps=SAVE_STEPS))
    recorder = Recorder(opt)
    trainer.add_callback(recorder)
    trainer.train()
    return tmp_path / "first" / f"checkpoint-{SAVE_STEPS}", recorder.saved_masks[SAVE_STEPS]


def _resume(tmp_path: Path, checkpoint: Path, model: ViTForImageClassification
            ) -> tuple[Trainer, BAMEAdamW, Recorder]:
    trainer, opt = build("adamw", training_args(tmp_path / "resumed"), model=model)
    recorder = Recorder(opt)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer, opt, recorder


def _assert_pruned_entries_zero(trainer: Trainer, opt: Optimizer) -> None:
    params = dict(trainer.model.named_parameters())
    for name, mask in masks(opt).items():
        assert not param_to_blocks(params[name].detach(), M)[~mask].any(), name
    assert all(row["nm_valid"] for row in sparse_rows(opt))


@SHORT_SCHEDULE
def test_resume_rezeroes_pruned_weights_loaded_behind_the_optimizer(tmp_path):
    checkpoint, saved = _first_run(tmp_path)
    # The model to resume holds non-zero values in the pruned entries, as a model edited or
    # reloaded from elsewhere would: the checkpoint's weights with its zeros set to 0.5.
    model = from_checkpoint(checkpoint)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in saved:
            params[name].masked_fill_(params[name] == 0, 0.5)
    edited = tmp_path / "edited"
    shutil.copytree(checkpoint, edited)
    model.save_pretrained(str(edited))

    trainer, opt, recorder = _resume(tmp_path, edited, from_checkpoint(edited))

    assert_masks_equal(recorder.begin_masks, saved)
    assert not any(recorder.begin_valid)  # dense weights, set behind the optimizer's back
    assert all(recorder.first_step_valid)  # the first step re-zeroed the pruned entries
    _assert_pruned_entries_zero(trainer, opt)


@SHORT_SCHEDULE
def test_resume_with_a_model_built_from_its_config_still_ends_nm(tmp_path):
    # The naive resume: a fresh model from the config. transformers 5.x's Trainer loads
    # model.safetensors with load_state_dict(strict=False), whose renamed keys (ViT's
    # encoder.layer.0.attention.attention.query -> layers.0.attention.q_proj) match nothing
    # (huggingface/transformers#43701): those layers keep their fresh values, dense. The
    # optimizer state is restored either way, so the first step makes them N:M again.
    checkpoint, saved = _first_run(tmp_path)
    fresh = tiny_vit(seed=1)
    before = {name: p.detach().clone() for name, p in fresh.named_parameters()}
    trainer, opt, recorder = _resume(tmp_path, checkpoint, fresh)

    assert_masks_equal(recorder.begin_masks, saved)
    assert all(recorder.first_step_valid)
    _assert_pruned_entries_zero(trainer, opt)
    saved_params = dict(from_checkpoint(checkpoint).named_parameters())
    restored = [torch.equal(recorder.begin_weights[name], saved_params[name]) for name in saved]
    if all(restored):  # a transformers release that maps the saved key names back
        assert all(recorder.begin_valid)
    else:  # huggingface/transformers#43701: the fresh, dense values
        assert not any(restored) and not any(recorder.begin_valid)
        assert all(torch.equal(recorder.begin_weights[name], before[name]) for name in saved)


@SHORT_SCHEDULE
def test_epoch_based_run_takes_the_counted_optimizer_steps(tmp_path):
    # 30 examples, batches of 4 -> 8 batches; 3-batch accumulation -> 3 steps per epoch;
    # 1.5 epochs -> ceil(4.5) = 5 optimizer steps.
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=1.5,
                         gradient_accumulation_steps=3, save_strategy="no")
    total = trainer_optimizer_steps(args, 30)
    assert total == 5
    trainer, opt = build("sgd", args, total_steps=total, dataset=tiny_dataset(30))
    trainer.train()
    assert trainer.state.global_step == total
    assert [group["step"] for group in opt.param_groups] == [total] * len(opt.param_groups)
    assert all(row["nm_valid"] for row in sparse_rows(opt))


@SHORT_SCHEDULE
def test_total_steps_too_small_ends_the_schedule_early_but_stays_nm(tmp_path):
    trainer, opt = build("adamw", training_args(tmp_path, save_strategy="no"),
                         total_steps=MAX_STEPS // 2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ran past total_steps", category=UserWarning)
        trainer.train()
    # t_i = 2, t_f = 4: the masks are fixed for the last 8 of the 12 steps.
    assert [group["step"] for group in opt.param_groups] == [MAX_STEPS] * len(opt.param_groups)
    assert all(row["nm_valid"] and row["phase"] == "frozen" for row in sparse_rows(opt))


def test_total_steps_too_large_needs_finalize_masks(tmp_path):
    trainer, opt = build("adamw", training_args(tmp_path / "run", save_strategy="no"),
                         total_steps=10 * MAX_STEPS)
    trainer.train()
    rows = sparse_rows(opt)
    assert all(row["phase"] == "gradual" for row in rows)  # t_i = 40 was never reached
    assert not all(row["nm_valid"] for row in rows)

    opt.finalize_masks()
    rows = sparse_rows(opt)
    assert all(row["nm_valid"] and row["density"] == N / M for row in rows), rows
    trainer.save_model(str(tmp_path / "final"))
    assert saved_weights_nm(tmp_path / "final", [row["name"] for row in rows])


def test_total_steps_too_large_warns_at_the_end_and_nm_check_finalizes(tmp_path):
    from bame_apps.integrations.hf_trainer import NMCheck

    trainer, opt = build("sgd", training_args(tmp_path / "run", save_strategy="no"),
                         total_steps=10 * MAX_STEPS)
    check = NMCheck(finalize=True)
    trainer.add_callback(check)
    with pytest.warns(UserWarning, match="training ended at step .* before t_i"):
        trainer.train()
    assert check.finished is False
    assert all(row["nm_valid"] and row["density"] == N / M for row in sparse_rows(opt))
