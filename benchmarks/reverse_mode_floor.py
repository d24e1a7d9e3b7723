"""What exact reverse mode itself costs on the end-to-end set-ups of ``benchmarks/overhead.py``.

For the digits MLP (SGD momentum 0.9) and the MNIST-1D CNN (Adam), per-layer learning rates and
weight decay, K = 20 and 256 validation examples per hyper-step, windows of K steps are timed
side by side (one window per sample, interleaved in a rotating order after a warm-up):

* plain: K ``torch.optim`` steps, as ``train()`` without hypergradients takes them;
* unrolled: ``hypermeta``'s unrolled window (``higher``), committed, as the engine runs it;
* floor: the same unroll in plain torch autograd, no ``higher`` and no engine --
  ``torch.func.functional_call``, ``torch.autograd.grad(create_graph=True)`` and the optimizer's
  arithmetic on tensors (``torch.optim``'s, with ``hypermeta``'s safe square root), then the
  validation loss and its backward to the log learning rates and weight decays: what any exact
  reverse-mode hypergradient through K steps computes;
* floor forward: the floor without that last backward.

Ratios are medians over repeats of ``time(mode) / time(plain)`` in the same repeat. ``floor, end
to end`` estimates the whole ``train()`` call: one timed ``train(hypergradient=None)`` run per
repeat, plus (floor - plain) for each of its windows. Run ``python benchmarks/reverse_mode_floor.py``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from hypermeta._engine import _plain_window, _Run, build_run
from hypermeta._private.diffopt import safe_sqrt
from hypermeta._private.unrolled import unrolled_window

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere
from overhead import END_TO_END, end_to_end_data, end_to_end_model, end_to_end_modes, interleaved_seconds  # noqa: E402

HORIZON = 20
VALID_BATCH = 256
MODES = ("plain", "unrolled", "floor", "floor forward", "train()")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per mode (7)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_run(name: str, seed: int) -> _Run:
    settings = END_TO_END[name]
    return build_run(
        end_to_end_model(name, seed), data=end_to_end_data(name, seed), steps=10**9,
        batch_size=settings["batch_size"], learning_rate=settings["learning_rate"],
        weight_decay=settings["weight_decay"], optimizer=settings["optimizer"],
        optimizer_options=settings.get("optimizer_options"), loss_fn=torch.nn.functional.cross_entropy,
        seed=seed, valid_batch_size=VALID_BATCH,
    )


def floor_window(run: _Run, *, backward: bool = True) -> list[torch.Tensor] | None:
    """K differentiable steps from the run's weights, the validation loss and (``backward``) its hypergradient.

    The optimizer state starts empty, as on a run's first window; nothing is written back.
    """
    names = {p: name for name, p in run.model.named_parameters()}
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    group_of = [index for index, group in enumerate(run.optimizer.param_groups) for _ in group["params"]]
    weights = [p.detach().requires_grad_() for p in params]
    lrs, decays = run.hyper.lrs(0), run.hyper.weight_decays()
    update = _adam if isinstance(run.optimizer, torch.optim.Adam) else _heavy_ball
    state = [{} for _ in weights]
    for step in range(1, HORIZON + 1):
        loss = _loss(run, names, params, weights, run.train_batches.next())
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        weights = [
            w - update(s, grad + decays[g] * w, step, lrs[g], run.optimizer.param_groups[g])
            for w, grad, g, s in zip(weights, grads, group_of, state, strict=True)
        ]
    valid_loss = _loss(run, names, params, weights, run.valid_batches.next())
    return torch.autograd.grad(valid_loss, run.hyper.tensors()) if backward else None


def _loss(run: _Run, names: dict, params: list, weights: list, batch) -> torch.Tensor:
    x, y = batch
    values = {names[p]: w for p, w in zip(params, weights, strict=True)}
    return run.loss_fn(torch.func.functional_call(run.model, values, (x,)), y)


# The steps are written in the order of hypermeta._private.diffopt's, so that the floor's hypergradient
# is the unrolled window's to rounding (float32 unrolls through Adam amplify reordered roundings).
def _heavy_ball(state: dict, grad: torch.Tensor, step: int, lr: torch.Tensor, group: dict) -> torch.Tensor:
    state["buffer"] = grad if step == 1 else torch.add(state["buffer"] * group["momentum"], grad)
    return lr * state["buffer"]


def _adam(state: dict, grad: torch.Tensor, step: int, lr: torch.Tensor, group: dict) -> torch.Tensor:
    (beta1, beta2), eps = group["betas"], group["eps"]
    if step == 1:
        state.update(exp_avg=torch.zeros_like(grad), exp_avg_sq=torch.zeros_like(grad))
    state["exp_avg"] = torch.lerp(state["exp_avg"], grad, 1 - beta1)
    state["exp_avg_sq"] = torch.addcmul(state["exp_avg_sq"] * beta2, grad, grad, value=1 - beta2)
    denom = safe_sqrt(state["exp_avg_sq"]) / math.sqrt(1 - beta2**step) + eps
    return lr / (1 - beta1**step) * (state["exp_avg"] / denom)


def modes(name: str, seed: int) -> dict[str, Callable[[], None]]:
    """Each mode as a function of nothing that takes one window (``train()``: one whole run)."""
    runs = {mode: make_run(name, seed) for mode in MODES[:4]}
    steps = dict.fromkeys(runs, 0)

    def plain() -> None:
        _plain_window(runs["plain"], steps["plain"], HORIZON).commit()
        steps["plain"] += HORIZON

    def unrolled() -> None:
        unrolled_window(runs["unrolled"], steps["unrolled"], HORIZON).commit()
        steps["unrolled"] += HORIZON

    return {
        "plain": plain, "unrolled": unrolled, "floor": lambda: floor_window(runs["floor"]),
        "floor forward": lambda: floor_window(runs["floor forward"], backward=False),
        "train()": end_to_end_modes(name, seed)["plain"],
    }


def measure(name: str, args: argparse.Namespace) -> dict:
    timed = modes(name, args.seed)
    times = interleaved_seconds({mode: timed[mode] for mode in MODES}, args.repeats)

    def over(mode: str, base: str = "plain") -> float:
        return statistics.median(t / b for t, b in zip(times[mode], times[base], strict=True))

    windows = END_TO_END[name]["steps"] / HORIZON
    end_to_end = [
        1 + windows * (floor - plain) / train
        for floor, plain, train in zip(times["floor"], times["plain"], times["train()"], strict=True)
    ]
    return {
        "model": name, "unrolled": over("unrolled"), "floor": over("floor"), "floor forward": over("floor forward"),
        "unrolled / floor": over("unrolled", "floor"), "floor end to end": statistics.median(end_to_end),
        "plain ms": 1000 * statistics.median(times["plain"]) / HORIZON,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print("$ " + shlex.join(["python", *sys.argv]))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s), K = {HORIZON}, "
          f"{VALID_BATCH} validation examples, {args.repeats} interleaved repeats\n")
    print("| model | unrolled / plain | floor / plain | floor forward / plain | unrolled / floor "
          "| floor, end to end (estimated) | plain ms/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in END_TO_END:
        row = measure(name, args)
        print(f"| {name} | {row['unrolled']:.2f}x | {row['floor']:.2f}x | {row['floor forward']:.2f}x "
              f"| {row['unrolled / floor']:.2f}x | {row['floor end to end']:.2f}x | {row['plain ms']:.2f} |")


if __name__ == "__main__":
    main()
