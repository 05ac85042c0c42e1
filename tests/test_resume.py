"""optckpt.resume: resume-step on fixtures and on checkpoints made by real torch.optim.

Every checkpoint here comes from ``torch.optim`` (or is a fixture); the failing cases plant
one defect each into such a checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import (
    RESUME_CHECKS,
    RecordedProgress,
    assert_bitwise_equal,
    saved_devices,
    step_by_recipe,
    tensors_by_path,
)

from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.io import load_checkpoint
from optckpt.layout import Layout, ParamSpec
from optckpt.names import AmbiguousNamesError
from optckpt.optim import names
from optckpt.resume import ResumeOptions, resume_step

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
_TOP_LEVEL = [*FIXTURES.glob("*.pt"), *FIXTURES.glob("*.ckpt"), *FIXTURES.glob("*.safetensors")]
FIXTURE_FILES = [
    *sorted(p for p in _TOP_LEVEL if p.name != "unsafe_namespace.pt"),
    FIXTURES / "hf_trainer" / "checkpoint-2",
    *sorted((FIXTURES / "regenerated").glob("*")),
]


def named_tensors(name: str) -> dict[str, torch.Tensor]:
    """A small model's weights: 2-D only for Muon, else 1- to 3-D."""
    shapes = {"a.weight": (5, 3), "b.weight": (2, 5)}
    if name != "Muon":
        shapes |= {"a.bias": (5,), "c.weight": (2, 3, 2)}
    return {n: torch.randn(s) for n, s in shapes.items()}


def torch_checkpoint(
    name: str, *, steps: int = 2, named: bool = True, groups: int = 2
) -> dict[str, Any]:
    """``{"model", "optimizer"}`` after ``steps`` steps of ``torch.optim.<name>`` on random
    gradients (one group for LBFGS, which allows no more)."""
    weights = named_tensors(name)
    items = list(weights.items())
    if name == "LBFGS":
        groups = 1
    split = [items[i::groups] for i in range(groups)]
    optimizer = getattr(torch.optim, name)(
        [
            {"params": [(n, p) if named else p for n, p in part], "lr": 0.01 * (i + 1)}
            for i, part in enumerate(split)
        ]
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for _ in range(steps):
        grads = [torch.randn_like(p) for p in params]
        if name == "LBFGS":

            def closure(grads: list[torch.Tensor] = grads) -> torch.Tensor:
                for p, g in zip(params, grads, strict=True):
                    p.grad = p.detach() - g
                return sum(
                    ((p.detach() - g) ** 2).sum() for p, g in zip(params, grads, strict=True)
                )

            optimizer.step(closure)
        else:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.to_sparse() if name == "SparseAdam" else g
            optimizer.step()
    return {"model": dict(weights), "optimizer": optimizer.state_dict()}


def save(tmp_path: Path, checkpoint: Any, name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def by_name(report: Any) -> dict[str, Any]:
    return {c.name: c for c in report.checks}


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_every_fixture_resumes_and_matches_torch(path: Path) -> None:
    report = resume_step(path, ResumeOptions(steps=2, check_torch=True))
    assert report.ok, report.checks
    assert by_name(report)["matches_torch"].ok


def test_the_unsafe_fixture_resumes_with_its_global_allowed() -> None:
    report = resume_step(
        FIXTURES / "unsafe_namespace.pt",
        ResumeOptions(allow_globals=["argparse.Namespace"], check_torch=True),
    )
    assert report.ok


@pytest.mark.parametrize("named", [True, False], ids=["param_names", "ids"])
@pytest.mark.parametrize("name", names())
def test_torch_made_checkpoints_resume_for_every_optimizer(
    tmp_path: Path, name: str, named: bool
) -> None:
    checkpoint = torch_checkpoint(name, named=named)  # two groups but for LBFGS
    path = save(tmp_path, checkpoint)
    from_layout = None
    if name == "SGD" and not named:
        # No momentum: no state, so nothing tells which weights each group holds; the groups
        # (every second weight) fit the weights in several ways, and naming refuses.
        with pytest.raises(AmbiguousNamesError, match=r"more than one way: ID 0 could be .*--from"):
            resume_step(path)
        model = checkpoint["model"]
        from_layout = Layout(
            {n: ParamSpec(tuple(t.shape)) for n, t in model.items()},
            [{"params": list(model)[i::2]} for i in range(2)],
        )
    report = resume_step(path, ResumeOptions(steps=2, check_torch=True, from_layout=from_layout))
    assert report.ok, report.checks
    assert report.optimizer == name
    assert report.params_from.startswith("model weights")
    assert [c.name for c in report.checks] == [*RESUME_CHECKS, "matches_torch"]


@pytest.mark.parametrize("name", names())
def test_bare_state_dicts_resume_on_seeded_parameters(tmp_path: Path, name: str) -> None:
    checkpoint = torch_checkpoint(name)
    report = resume_step(save(tmp_path, checkpoint["optimizer"]), ResumeOptions(check_torch=True))
    assert report.ok, report.checks
    assert report.params_from.startswith("seeded")


def test_steps_advance_the_counters_by_n(tmp_path: Path) -> None:
    path = save(tmp_path, torch_checkpoint("Adam", steps=2))
    report = resume_step(path, ResumeOptions(steps=3))
    assert report.ok
    assert by_name(report)["step_counters_advance"].detail == "every counter advanced by 3"
    assert by_name(report)["step_counters_agree"].detail == "group 0: 2, group 1: 2"


def test_a_nan_in_exp_avg_sq_fails(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("AdamW")
    checkpoint["optimizer"]["state"][1]["exp_avg_sq"].view(-1)[0] = float("nan")
    report = resume_step(save(tmp_path, checkpoint))
    checks = by_name(report)
    assert not report.ok
    assert checks["finite_before"].ok is False
    assert "exp_avg_sq of ID 1 (a.bias): 1 non-finite value(s)" in checks["finite_before"].detail
    assert checks["finite_after"].ok is False
    assert checks["shapes"].ok and checks["loads"].ok


def test_step_counters_that_disagree_fail(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("Adam")
    checkpoint["optimizer"]["state"][0]["step"] = torch.tensor(7.0)
    report = resume_step(save(tmp_path, checkpoint))
    check = by_name(report)["step_counters_agree"]
    assert not report.ok and check.ok is False
    assert check.detail == "group 0: step 2 for 1, 7 for 1"


def test_a_state_tensor_of_another_shape_fails_and_skips_the_step(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("Adam")
    state = checkpoint["optimizer"]["state"][0]
    state["exp_avg"] = state["exp_avg"].t().contiguous()
    out = tmp_path / "after.pt"
    report = resume_step(save(tmp_path, checkpoint), ResumeOptions(check_torch=True, out=out))
    checks = by_name(report)
    assert not report.ok
    assert not out.exists() and f"nothing written to {out}: a check failed" in report.notes
    assert checks["shapes"].ok is False
    assert "exp_avg of ID 0 (a.weight) is [3, 5], expected [5, 3]" in checks["shapes"].detail
    assert [checks[n].ok for n in ("steps_taken", "finite_after", "matches_torch")] == [None] * 3


def test_adafactor_factored_moments_are_shape_checked(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("Adafactor")
    state = checkpoint["optimizer"]["state"][0]
    state["row_var"] = torch.zeros(7, 1)
    report = resume_step(save(tmp_path, checkpoint))
    assert by_name(report)["shapes"].ok is False
    assert (
        "row_var of ID 0 (a.weight) is [7, 1], expected [5, 1]" in by_name(report)["shapes"].detail
    )


def test_a_group_size_mismatch_is_incompatible(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("Adam", named=False)
    del checkpoint["model"]["c.weight"]  # the state was saved for a bigger model
    with pytest.raises(
        IncompatibleStateError,
        match=r"4 parameter IDs .* do not fit the 3 parameters .*more IDs \(4\) than .*remap",
    ):
        resume_step(save(tmp_path, checkpoint))


def test_state_that_fits_no_weight_by_shape_is_incompatible(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("Adam", named=False)
    checkpoint["model"]["c.weight"] = torch.zeros(7, 7)
    with pytest.raises(IncompatibleStateError, match=r"shape of ID 3's state \[2, 3, 2\]"):
        resume_step(save(tmp_path, checkpoint))


def test_unnamed_weight_decay_groups_are_matched_by_shape(tmp_path: Path) -> None:
    # the nanoGPT / Trainer split: matrices decay, vectors do not; IDs follow the groups
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    )
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    path = save(tmp_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    report = resume_step(path, ResumeOptions(check_torch=True))
    assert report.ok, report.checks
    assert report.params_from.endswith("by state shape in model order (no param_names)")


def test_unnamed_checkpoints_with_frozen_parameters_resume(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    path = save(tmp_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    report = resume_step(path, ResumeOptions(check_torch=True))
    assert report.ok, report.checks
    assert "1 model parameter(s) not in the optimizer (frozen)" in report.notes


def test_a_named_parameter_missing_from_the_weights_is_incompatible(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("Adam")
    del checkpoint["model"]["b.weight"]
    with pytest.raises(
        IncompatibleStateError, match=r"lack: b.weight; run `optckpt remap .*--dry-run`"
    ):
        resume_step(save(tmp_path, checkpoint))


def test_names_and_ids_that_do_not_line_up_are_incompatible(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("Adam")
    checkpoint["optimizer"]["param_groups"][0]["param_names"].pop()
    with pytest.raises(
        IncompatibleStateError, match="group 0 lists 2 parameter IDs but 1 param_names"
    ):
        resume_step(save(tmp_path, checkpoint))


def test_an_unsure_guess_lists_the_candidates(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("Adam")
    for group in checkpoint["optimizer"]["param_groups"]:
        del group["decoupled_weight_decay"]  # as torch < 2.1 saved Adam and AdamW
    path = save(tmp_path, checkpoint)
    with pytest.raises(IncompatibleStateError, match=r"candidates: Adam, AdamW.*--optimizer"):
        resume_step(path)
    report = resume_step(path, ResumeOptions(optimizer="adam", check_torch=True))
    assert report.ok and report.optimizer_from == "--optimizer"


def test_model_weights_from_another_file(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("RMSprop")
    optimizer_file = save(tmp_path, checkpoint["optimizer"], "optimizer.pt")
    model_file = save(tmp_path, checkpoint["model"], "model.pt")
    report = resume_step(optimizer_file, ResumeOptions(model=model_file, check_torch=True))
    assert report.ok
    assert report.params_from == f"model weights in {model_file}, by param_names"
    with pytest.raises(UsageError, match="holds no model state dict"):
        resume_step(optimizer_file, ResumeOptions(model=optimizer_file))


def test_matches_torch_fails_on_a_difference_and_atol_accepts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Drifting(torch.optim.AdamW):
        def step(self, closure: Any = None) -> Any:
            result = super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].add_(1e-6)
            return result

    monkeypatch.setattr(torch.optim, "AdamW", Drifting)
    path = save(tmp_path, torch_checkpoint("AdamW"))
    report = resume_step(path, ResumeOptions(check_torch=True))
    check = by_name(report)["matches_torch"]
    assert not report.ok and check.ok is False
    assert "parameter ID 0 (a.weight)" in check.detail
    assert resume_step(path, ResumeOptions(check_torch=True, atol=1e-4)).ok
    with pytest.raises(UsageError, match="--atol applies to --check-torch"):
        resume_step(path, ResumeOptions(atol=1e-4))


def test_update_sizes_of_plain_sgd_are_lr_times_the_gradients(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("SGD")
    report = resume_step(save(tmp_path, checkpoint), ResumeOptions(seed=4))
    # the documented gradients of seed 4, in ID order
    gen = torch.Generator().manual_seed(5)
    optimizer = checkpoint["optimizer"]
    shapes = {n: t.shape for n, t in checkpoint["model"].items()}
    for group, update in zip(optimizer["param_groups"], report.groups, strict=True):
        grads = [torch.randn(shapes[n], generator=gen) for n in group["param_names"]]
        numel = sum(g.numel() for g in grads)
        rms = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads) / numel)
        assert update.lr == group["lr"]
        assert update.update_rms == pytest.approx(group["lr"] * rms, rel=1e-5)
        assert update.effective_lr is None  # SGD is not adaptive
    adam = resume_step(save(tmp_path, torch_checkpoint("Adam"), "adam.pt"))
    assert all(g.effective_lr is not None and g.effective_lr > 0 for g in adam.groups)


def test_output_holds_the_stepped_state_equal_to_torchs(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("AdamW")
    path = save(tmp_path, checkpoint)
    out = tmp_path / "after.pt"
    report = resume_step(path, ResumeOptions(steps=2, seed=3, out=out))
    assert report.ok and report.out == out
    written = torch.load(out, weights_only=True)
    # the same two steps with torch.optim, by the documented recipe
    saved = torch.load(path, weights_only=True)
    params = {n: t.clone() for n, t in saved["model"].items()}
    optimizer = torch.optim.AdamW(
        [
            {"params": [(n, params[n]) for n in g["param_names"]]}
            for g in saved["optimizer"]["param_groups"]
        ]
    )
    optimizer.load_state_dict(saved["optimizer"])
    step_by_recipe(optimizer, steps=2, seed=3)
    assert_bitwise_equal(written["optimizer"], optimizer.state_dict())
    assert_bitwise_equal(written["model"], params)


def test_nothing_is_written_when_a_check_fails(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("Adam")
    checkpoint["optimizer"]["state"][0]["step"] = torch.tensor(9.0)
    out = tmp_path / "after.pt"
    report = resume_step(save(tmp_path, checkpoint), ResumeOptions(out=out))
    assert not report.ok and report.out is None
    assert not out.exists()
    assert f"nothing written to {out}: a check failed" in report.notes


def test_the_input_is_never_modified(tmp_path: Path) -> None:
    path = save(tmp_path, torch_checkpoint("Adam"))
    before = path.read_bytes()
    resume_step(path, ResumeOptions(steps=2, check_torch=True, out=tmp_path / "out.safetensors"))
    assert path.read_bytes() == before


def test_several_optimizers_need_a_key(tmp_path: Path) -> None:
    a, b = torch_checkpoint("Adam"), torch_checkpoint("SGD")
    path = save(tmp_path, {"optimizer_states": [a["optimizer"], b["optimizer"]]})
    with pytest.raises(UsageError, match=r"'optimizer_states.0', 'optimizer_states.1'.*--key"):
        resume_step(path)
    report = resume_step(path, ResumeOptions(key="optimizer_states.1", check_torch=True))
    assert report.ok and report.optimizer == "SGD" and report.key == "optimizer_states.1"


def test_json_has_ok_and_one_entry_per_check(tmp_path: Path) -> None:
    report = resume_step(save(tmp_path, torch_checkpoint("Adam")), ResumeOptions(check_torch=True))
    data = report.to_json()
    assert data["ok"] is True
    assert [set(c) for c in data["checks"]] == [{"name", "ok", "detail"}] * 8
    assert set(data["groups"][0]) == {
        "index",
        "num_params",
        "lr",
        "update_rms",
        "update_max",
        "effective_lr",
    }


def test_complex_parameters_resume_and_match_torch(tmp_path: Path) -> None:
    weights = {
        "w": torch.randn(4, 3, dtype=torch.complex64),
        "b": torch.randn(4, dtype=torch.complex64),
    }
    optimizer = torch.optim.Adam(list(weights.items()))
    for p in weights.values():
        p.grad = torch.randn_like(p)
    optimizer.step()
    path = save(tmp_path, {"model": weights, "optimizer": optimizer.state_dict()})
    report = resume_step(path, ResumeOptions(steps=2, check_torch=True))
    assert report.ok, report.checks
    assert all(g.update_rms > 0 for g in report.groups)


def test_a_capturable_checkpoint_steps_on_the_cpu_without_capture(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("Adam")
    for group in checkpoint["optimizer"]["param_groups"]:
        group["capturable"] = True  # as saved from a CUDA-graph training run
    param = torch.zeros(1)
    refused = torch.optim.Adam([param], capturable=True)
    param.grad = torch.ones(1)
    with pytest.raises(AssertionError, match="capturable=True"):
        refused.step()  # what torch does on a CPU
    report = resume_step(save(tmp_path, checkpoint), ResumeOptions(check_torch=True))
    assert report.ok, report.checks
    assert report.notes[-2:] == [
        f"group {i} was saved with capturable=True, which steps only on an accelerator: "
        "stepped with capturable=False on the CPU"
        for i in (0, 1)
    ]


def test_tied_weights_stay_tied_in_the_written_checkpoint(tmp_path: Path) -> None:
    emb = torch.nn.Embedding(6, 4)
    head = torch.nn.Linear(4, 6, bias=False)
    head.weight = emb.weight  # tied, as in GPT-2
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    optimizer = torch.optim.Adam(model.parameters())
    model["head"](model["emb"](torch.tensor([1, 2]))).sum().backward()
    optimizer.step()
    state = model.state_dict()
    assert set(state) == {"emb.weight", "head.weight"}
    path = save(tmp_path, {"model": state, "optimizer": optimizer.state_dict()})
    out = tmp_path / "after.pt"
    report = resume_step(path, ResumeOptions(out=out, check_torch=True))
    assert report.ok, report.checks
    assert not any("frozen" in n for n in report.notes)  # the alias is no frozen parameter
    written = torch.load(out, weights_only=True)["model"]
    assert torch.equal(written["emb.weight"], written["head.weight"])
    assert not torch.equal(written["emb.weight"], state["emb.weight"])


@pytest.mark.parametrize(
    ("name", "missing"), [("sgd", "dampening, momentum, nesterov"), ("lbfgs", "history_size")]
)
def test_an_optimizer_named_wrongly_is_incompatible(
    tmp_path: Path, name: str, missing: str
) -> None:
    path = save(tmp_path, torch_checkpoint("Adam"))
    with pytest.raises(IncompatibleStateError, match=f"group 0 has no {missing}"):
        resume_step(path, ResumeOptions(optimizer=name))


@pytest.mark.parametrize("orphan", ["0", 99])
def test_state_that_belongs_to_no_parameter_fails(tmp_path: Path, orphan: Any) -> None:
    checkpoint = torch_checkpoint("Adam")
    state = checkpoint["optimizer"]["state"]
    if orphan == "0":
        state["0"] = state.pop(0)  # as a JSON round trip leaves it
    else:
        state[orphan] = dict(state[0])
    report = resume_step(save(tmp_path, checkpoint))
    check = by_name(report)["loads"]
    assert not report.ok and check.ok is False
    assert check.detail == f"state under {orphan!r} belongs to no parameter of the groups"


def test_nan_step_counters_fail_with_a_readable_detail(tmp_path: Path) -> None:
    checkpoint = torch_checkpoint("Adam")
    for pid in (0, 1):
        checkpoint["optimizer"]["state"][pid]["step"] = torch.tensor(float("nan"))
    report = resume_step(save(tmp_path, checkpoint))
    check = by_name(report)["step_counters_agree"]
    assert check.ok is False and check.detail == "group 0: step nan for 2"


def test_output_of_a_cuda_checkpoint_keeps_its_saved_devices(tmp_path: Path) -> None:
    """Stepped on the CPU, written back tagged as the input was (cuda:0; steps on the CPU)."""
    out = tmp_path / "after.pt"
    report = resume_step(FIXTURES / "cuda_adam.pt", ResumeOptions(out=out))
    assert report.ok
    assert any(n.startswith("the input was saved on cuda:0;") for n in report.notes)
    before = load_checkpoint(FIXTURES / "cuda_adam.pt")
    after = load_checkpoint(out)
    assert saved_devices(after) == saved_devices(before)
    for key in ("model", "optimizer"):
        old, new = tensors_by_path(before.root[key]), tensors_by_path(after.root[key])
        assert old.keys() == new.keys()
        if key == "model":
            for path, t in new.items():
                assert not torch.equal(t, old[path]), path  # stepped, not copied


def test_a_dtype_safetensors_cannot_hold_is_refused_before_the_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = {"w": torch.randn(3, dtype=torch.complex128)}
    optimizer = torch.optim.Adam(weights.values())
    path = save(tmp_path, {"model": weights, "optimizer": optimizer.state_dict()})

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the steps ran")

    monkeypatch.setattr("optckpt.synthetic.take_steps", never)  # imported when stepping
    with pytest.raises(UsageError, match=r"in safetensors: it has no torch\.complex128"):
        resume_step(path, ResumeOptions(out=tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()


def test_writing_reports_its_bytes_to_progress(tmp_path: Path) -> None:
    """-o asks for a progress callback sized by the tensors to write, then feeds it."""
    progress = RecordedProgress()
    out = tmp_path / "out.pt"
    assert resume_step(FIXTURES / "adamw_train.pt", ResumeOptions(out=out), progress=progress).ok
    tree = torch.load(out, weights_only=True)
    total = sum(t.numel() * t.element_size() for t in tensors_by_path(tree).values())
    assert progress.started == [total]
    assert total <= sum(progress.written) <= out.stat().st_size
    assert resume_step(FIXTURES / "adamw_train.pt", progress=progress).ok  # nothing to write
    assert len(progress.started) == 1


def test_check_torch_bitwise_means_the_same_bits_as_diff() -> None:
    """One meaning of "bitwise" (chunks.same_bits): -0.0 is not 0.0, NaNs with equal bits are
    equal, a NaN with other bits is not; within --atol, values compare as numbers."""
    from optckpt.chunks import same_bits
    from optckpt.resume.torch_compare import _same

    zero, negative_zero = torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0])
    nan = torch.tensor([float("nan")])
    other_nan = nan.view(torch.int32).add(1).view(torch.float32)
    for compare in (_same, lambda a, b, atol: same_bits(a, b)):
        assert not compare(zero, negative_zero, None)
        assert compare(nan, nan.clone(), None)
        assert not compare(nan, other_nan, None)
    assert _same(zero, negative_zero, 0.0)
    assert _same({"lr": float("nan")}, {"lr": float("nan")}, None)


def _two_optimizers(tmp_path: Path, *, nan: bool = False) -> Path:
    """A checkpoint with two torch.optim state dicts (Adam and RMSprop, as a GAN saves
    them); with ``nan``, a NaN planted in the second one's state."""
    checkpoint = {
        "gen": torch_checkpoint("Adam")["optimizer"],
        "disc": torch_checkpoint("RMSprop")["optimizer"],
    }
    if nan:
        checkpoint["disc"]["state"][0]["square_avg"].view(-1)[0] = float("nan")
    return save(tmp_path, checkpoint, "nan.pt" if nan else "two.pt")


def test_every_optimizer_is_checked_on_its_own(tmp_path: Path) -> None:
    from optckpt.resume import ResumeOptions, resume_each

    run = resume_each(_two_optimizers(tmp_path, nan=True))
    assert [(r.key, r.optimizer, r.ok) for r in run.results] == [
        ("gen", "Adam", True),
        ("disc", "RMSprop", False),
    ]
    assert not run.ok
    data = run.to_json()
    assert data["ok"] is False and [r["key"] for r in data["results"]] == ["gen", "disc"]
    # one optimizer, or --key: the report of that one, as it always was
    one = resume_each(_two_optimizers(tmp_path), ResumeOptions(key="gen")).to_json()
    assert one["key"] == "gen" and "results" not in one


def test_out_holds_every_optimizer_stepped_as_each_alone(tmp_path: Path) -> None:
    from optckpt.resume import ResumeOptions, resume_each

    path = _two_optimizers(tmp_path)
    run = resume_each(path, ResumeOptions(steps=2, out=tmp_path / "both.pt"))
    assert run.ok and run.out == tmp_path / "both.pt"
    both = torch.load(tmp_path / "both.pt", weights_only=True)
    for key in ("gen", "disc"):
        assert resume_step(path, ResumeOptions(key=key, steps=2, out=tmp_path / f"{key}.pt")).ok
        alone = torch.load(tmp_path / f"{key}.pt", weights_only=True)
        assert_bitwise_equal(both[key], alone[key])
    # nothing is written when one of them fails
    run = resume_each(_two_optimizers(tmp_path, nan=True), ResumeOptions(out=tmp_path / "never.pt"))
    assert not run.ok and run.out is None and not (tmp_path / "never.pt").exists()
    assert any("nothing written" in note for note in run.notes)


def test_one_optimizer_apis_refuse_several_and_list_them(tmp_path: Path) -> None:
    from optckpt.resume import ResumeOptions, resume_each

    path = _two_optimizers(tmp_path)
    with pytest.raises(UsageError, match="several optimizer state dicts \\('gen', 'disc'\\)"):
        resume_step(path)
    with pytest.raises(UsageError, match=r"--optimizer names one optimizer.*'gen', 'disc'"):
        resume_each(path, ResumeOptions(optimizer="adam"))
