"""memory.py's arithmetic against measurement on CPU (bytes, never time), and train.py's memory line, refusal and
out-of-memory exit."""

import contextlib
import subprocess
import sys
import weakref
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import memory
import model as model_module
import runtime
import train
from conftest import ROOT
from memory import GiB, Run
from model import GPT, GPTConfig

# --- weights, gradients and optimizer state after one real step -------------------------------------------------

STATE_TOLERANCE = 0.005  # the arithmetic counts each tensor of each kind: it should be exact to the byte


def tensor_bytes(t):
    """Bytes a tensor holds; a tensor subclass (torchao's 8-bit state) holds its inner tensors."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def measured_state(model, optimizer):
    params = list(model.parameters())
    return dict(weights=sum(tensor_bytes(p) for p in params), grads=sum(tensor_bytes(p.grad) for p in params),
                optimizer=sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values()
                              if isinstance(v, torch.Tensor)))


def torchao_optimizer(kind, params):
    optim = pytest.importorskip("torchao.optim")
    if kind == "adamw-sr":
        return optim._AdamW(params, bf16_stochastic_round=True)
    return optim.AdamW8bit(params, bf16_stochastic_round=kind == "adamw8bit-sr")


# 192 wide and a vocabulary of 1001: the token table (192192 values) is no multiple of 256, so AdamW8bit keeps its
# moments in full precision, as it does for biases and norm gains (< 4096 values); the other matrices are quantized
STATE_CONFIG = GPTConfig(block_size=32, vocab_size=1001, n_layer=2, n_head=4, n_embd=192)


@pytest.mark.parametrize("optim, param_dtype, kind", [
    ("adamw", "float32", "torch"), ("adamw8bit", "float32", "adamw8bit"),
    ("adamw", "bfloat16", "adamw-sr"), ("adamw8bit", "bfloat16", "adamw8bit-sr")])
def test_weights_grads_and_optimizer_state_are_the_arithmetic(optim, param_dtype, kind, monkeypatch):
    torch.manual_seed(0)
    model = GPT(STATE_CONFIG).to(getattr(torch, param_dtype))
    if kind == "torch":  # what train.py builds (runtime.place)
        optimizer = model.configure_optimizer(0.01, 1e-3, (0.9, 0.999), "cpu", "all")
    else:  # torchao compiles its step per tensor shape (~45 s on 2 CPU cores); eager keeps the same state tensors
        monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
        optimizer = torchao_optimizer(kind, model.parameters())
    x = torch.randint(STATE_CONFIG.vocab_size, (2, 32))
    model(x, x)[1].sum().backward()
    optimizer.step()
    got = measured_state(model, optimizer)
    want = memory.estimate(model, Run(optim=optim, param_dtype=param_dtype, dtype="float32"))
    for part, value in got.items():
        assert abs(value - getattr(want, part)) <= STATE_TOLERANCE * value, (part, value, getattr(want, part))
    assert all(p.grad.dtype == p.dtype for p in model.parameters())  # gradients in the weights' dtype


def test_bytes_per_parameter_are_the_documented_ones():
    """docs/memory.md's bytes per parameter, on a real shape (OPT-1.3B): 16, ~10, 8, ~6."""
    model = memory.meta_model(memory.PUBLIC["OPT-1.3B"])
    n = sum(memory.parameters(model))
    per_param = {choice: (lambda m: (m.weights + m.grads + m.optimizer) / n)(memory.estimate(model, Run(
        optim=choice[0], param_dtype=choice[1]))) for choice in memory.CHOICES}
    assert per_param[("adamw", "float32")] == pytest.approx(16, abs=0.01)
    assert per_param[("adamw8bit", "float32")] == pytest.approx(10.03, abs=0.02)
    assert per_param[("adamw", "bfloat16")] == pytest.approx(8, abs=0.01)
    assert per_param[("adamw8bit", "bfloat16")] == pytest.approx(6.03, abs=0.02)


# --- activations: what autograd saves in a forward pass ----------------------------------------------------------

# model.py's blocks are counted tensor by tensor: exact on CPU today, but for bf16 weights' LayerNorm statistics
# (bf16 on CPU, float32 on CUDA: 0.5-0.8% here); 1% leaves room for scalars a torch version may add
ACTIVATION_TOLERANCE = 0.01

FAMILIES = {
    "gpt2": GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=64),
    "opt": GPTConfig(family="opt", block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=64, mlp="relu",
                     pos_offset=2),
    "opt-350m": GPTConfig(family="opt", block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=64, mlp="relu",
                          pos_offset=2, prenorm=False, embd_dim=32),
    "llama": GPTConfig(family="llama", block_size=64, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       mlp="swiglu", mlp_hidden=96, bias=False, norm="rmsnorm", pos="rope", tie_embeddings=False),
}


class ParameterCasts(TorchDispatchMode):
    """Autocast's copies of parameters, held weakly: alive only while autograd or autocast's cache holds them."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.nn.Parameter):
            self.copies.append(weakref.ref(out))
        return out


def measure_forward(model, x, y, dtype, monkeypatch):
    """Bytes of the unique storages autograd saves in a training forward pass, parameters and their compute-dtype
    copies excluded; the copies alive at its end; and what the loss (loss.py, chunked) saves, apart."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {"activations": {}, "loss": {}}

    def packer(bucket):
        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                saved[bucket][storage.data_ptr()] = storage.nbytes()
            return t
        return pack

    def loss_apart(*args, _loss=model_module.chunked_per_sample_cross_entropy):
        with torch.autograd.graph.saved_tensors_hooks(packer("loss"), lambda t: t):
            return _loss(*args)

    monkeypatch.setattr(model_module, "chunked_per_sample_cross_entropy", loss_apart)
    casts = ParameterCasts()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    with autocast:
        with torch.autograd.graph.saved_tensors_hooks(packer("activations"), lambda t: t), casts:
            model(x, y)
        alive = [c() for c in casts.copies if c() is not None]  # before autocast's cache is cleared on exit
        copies = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
    return dict(activations=sum(b for ptr, b in saved["activations"].items() if ptr not in copies),
                weight_copies=sum(copies.values()), loss=sum(saved["loss"].values()))


# grouped-query attention (SDPA's enable_gqa) runs on CPU in the fused kernel that the arithmetic counts (as CUDA's
# flash kernel does) from torch 2.9; before (2.6-2.8), in the math kernel, which saves the (T, T) attention weights
CPU_FUSES_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 9)

# (family, weights' dtype, autocast dtype): float32 weights in every family, bare and under bf16 autocast; bf16 weights
# where CPU runs the norms as CUDA does (RMSNorm is plain ops; CPU autocast, unlike CUDA's, runs layer_norm in bf16)
CASES = [(f, "float32", d) for f in FAMILIES for d in ("float32", "bfloat16")] + [
    ("llama", "bfloat16", "float32"), ("llama", "bfloat16", "bfloat16"), ("gpt2", "bfloat16", "float32"),
    ("opt-350m", "bfloat16", "float32")]


@pytest.mark.parametrize("grad_ckpt", [False, True])
@pytest.mark.parametrize("family, param_dtype, dtype", CASES)
def test_activations_are_what_autograd_saves(family, param_dtype, dtype, grad_ckpt, monkeypatch):
    config, B, T = FAMILIES[family], 3, 40
    if config.n_kv_head != config.n_head and not grad_ckpt and not CPU_FUSES_GQA:
        pytest.skip("torch < 2.9 runs grouped-query attention on CPU in SDPA's math kernel, not the fused one")
    torch.manual_seed(0)
    model = GPT(config).to(getattr(torch, param_dtype)).train()
    model.grad_ckpt = grad_ckpt
    x, y = torch.randint(config.vocab_size, (B, T)), torch.randint(config.vocab_size, (B, T))
    got = measure_forward(model, x, y, dtype, monkeypatch)
    want = memory.estimate(model, Run(batch_size=B, block_size=T, grad_ckpt=grad_ckpt, dtype=dtype,
                                      param_dtype=param_dtype))
    p = memory.BYTES[param_dtype]
    parts = memory.activation_bytes(config, want.run, p, memory.BYTES[dtype] if dtype != "float32" else p, grad_ckpt)
    assert sum(parts.values()) == want.activations
    forward = want.activations - parts["recompute"]  # the recomputed block exists in the backward pass only
    if grad_ckpt and config.pos == "rope":  # RoPE's cos and sin reach the checkpoint in a tuple: kept, but unseen
        forward -= 2 * 4 * T * config.head_dim
    assert got["loss"] == parts["head_input"]  # the chunked loss keeps the hidden states, never the logits
    forward -= parts["head_input"]
    assert abs(got["activations"] - forward) <= ACTIVATION_TOLERANCE * forward, (got, parts)
    assert got["weight_copies"] == want.weight_copies  # all of them, held by autograd or by autocast's cache


class LiveBytes(TorchDispatchMode):
    """The most bytes alive at once in the tensors that operations make (inputs made before aside), by storage."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def release(self, key):
        self.live[key][1] -= 1
        if not self.live[key][1]:
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                self.live.setdefault(key, [t.untyped_storage().nbytes(), 0])[1] += 1
                weakref.finalize(t, self.release, key)
        self.peak = max(self.peak, sum(n for n, _ in self.live.values()))
        return out


@pytest.mark.parametrize("autocast", [False, True])
def test_the_loss_holds_at_most_loss_bytes_per_logit_of_one_chunk(autocast):
    """loss.py's forward and backward, 1024 tokens in chunks of 256: what they allocate at once, the weight-sized
    tensors aside (the gradient of the head, autocast's bf16 copy of it), is one chunk's logits times at most
    LOSS_BYTES_PER_LOGIT, and at least their float32 size (the measure has teeth)."""
    from loss import chunked_per_sample_cross_entropy
    N, C, V, chunk = 1024, 64, 50000, 256
    h = torch.randn(1, N, C, requires_grad=True)
    W, y = torch.randn(V, C, requires_grad=True), torch.randint(V, (1, N))
    weight_sized = V * C * (4 + 2 * autocast)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), LiveBytes() as forward:
        loss = chunked_per_sample_cross_entropy(h, W, y, None, chunk)
    with LiveBytes() as backward:
        loss.sum().backward()
    for seen in (forward, backward):
        assert 4 * chunk * V <= seen.peak - weight_sized <= memory.LOSS_BYTES_PER_LOGIT * chunk * V


def test_grad_ckpt_keeps_block_inputs_and_recomputes_one_block():
    model = memory.meta_model(memory.PUBLIC["Llama-2-7B"])
    plain, ckpt = (memory.estimate(model, Run(grad_ckpt=on)) for on in (False, True))
    assert plain.activations == ckpt.other_activations and ckpt.activations < plain.activations / 8
    tokens, c = 8 * 512, model.config
    parts = memory.activation_bytes(c, ckpt.run, 4, 2, True)
    assert parts["blocks"] == tokens * c.n_embd * 4 * c.n_layer and parts["recompute"] * c.n_layer == (
        memory.activation_bytes(c, plain.run, 4, 2, False)["blocks"])


def test_the_loss_term_follows_the_models_chunk():
    model = memory.meta_model(memory.PUBLIC["Llama-3-8B"])
    model.loss_chunk = 0  # all at once: the plain form's full logits
    full = memory.estimate(model, Run()).loss
    assert full == 8 * 512 * 128256 * memory.FULL_LOGITS_BYTES_PER_LOGIT
    model.loss_chunk = 1024  # the chunked loss (model.loss_chunk): a quarter of the micro-batch's tokens at a time,
    head_cast = 128256 * 4096 * 2  # and its own bf16 copy of the head's weight
    chunked = 1024 * 128256 * memory.LOSS_BYTES_PER_LOGIT
    assert memory.estimate(model, Run()).loss == chunked + head_cast
    assert memory.estimate(model, Run(loss_chunk=0)).loss == full  # 0: all at once
    assert memory.estimate(model, Run(dtype="float32")).loss == chunked  # no autocast: nothing to cast


# --- suggestions ---------------------------------------------------------------------------------------------------

def test_candidates_come_in_order_of_cost_and_keep_the_effective_batch():
    run = Run(batch_size=8, grad_accum=1)
    got = [memory.flags(r, run) for r in memory.candidates(run)]
    assert got[:9] == ["--optim adamw8bit", "--param_dtype bfloat16", "--optim adamw8bit --param_dtype bfloat16",
                       "--grad_ckpt", "--optim adamw8bit --grad_ckpt", "--param_dtype bfloat16 --grad_ckpt",
                       "--optim adamw8bit --param_dtype bfloat16 --grad_ckpt", "--batch_size 4 --grad_accum 2",
                       "--optim adamw8bit --batch_size 4 --grad_accum 2"]
    assert got[-1] == "--optim adamw8bit --param_dtype bfloat16 --grad_ckpt --batch_size 1 --grad_accum 8"
    assert all(r.batch_size * r.grad_accum == 8 for r in memory.candidates(run))
    on = Run(grad_ckpt=True, optim="adamw8bit")  # switches already on stay on, and are never named
    assert [memory.flags(r, on) for r in memory.candidates(on)][:2] == ["--param_dtype bfloat16",
                                                                         "--batch_size 4 --grad_accum 2"]


@pytest.mark.parametrize("name, gpu, want", [  # GiB; each case a few GiB away from the next candidate's need
    ("Llama-2-7B", 141, "--optim adamw8bit"),  # 113 GiB with the margin; 154 as asked
    ("OPT-1.3B", 24, "--optim adamw8bit"),  # 22.3 GiB; 30.4 as asked
    ("Llama-2-7B", 80, "--optim adamw8bit --param_dtype bfloat16"),  # 69.3; --param_dtype bfloat16 alone: 82.9
    ("Sheared-LLaMA-1.3B", 16, "--param_dtype bfloat16 --grad_ckpt"),  # 12.2; --optim adamw8bit --grad_ckpt: 18.1
    ("Llama-3-8B", 80, "--optim adamw8bit --param_dtype bfloat16"),  # 78.4; --param_dtype bfloat16 alone: 94.6
    ("Llama-3-8B", 56, "--optim adamw8bit --param_dtype bfloat16 --grad_ckpt"),  # 52.0; without adamw8bit: 68.2
    ("Llama-3-8B", 52, "--optim adamw8bit --param_dtype bfloat16 --grad_ckpt --batch_size 4 --grad_accum 2"),  # 51.0 of 51
    ("Llama-3-8B", 40, None),  # even micro-batch 1 with every switch needs 50.2
])
def test_the_first_combination_that_fits_is_named(name, gpu, want):
    model, run = memory.meta_model(memory.PUBLIC[name]), Run()
    free = gpu * GiB - memory.CUDA_CONTEXT
    better = memory.suggest(model, run, free)
    assert (better and memory.flags(better, run)) == want
    if better is None:
        assert memory.remedy(model, run, free).startswith("even --optim adamw8bit --param_dtype bfloat16 --grad_ckpt "
                                                          "--batch_size 1 --grad_accum 8 needs")
        return
    assert memory.fits(memory.estimate(model, better), free)
    for earlier in memory.candidates(run):  # none before it fits
        if earlier == better:
            break
        assert not memory.fits(memory.estimate(model, earlier), free)


def test_fsdp_divides_weights_grads_and_optimizer_by_the_world_size():
    model = memory.meta_model(memory.PUBLIC["Llama-2-7B"])
    one, four = (memory.estimate(model, Run(fsdp=True, world=w)) for w in (1, 4))
    for part in ("weights", "grads", "optimizer"):
        assert getattr(four, part) == -(-getattr(one, part) // 4)
    assert four.activations == one.activations and four.loss == one.loss
    assert "1/4 each, FSDP" in four.summary()
    assert memory.estimate(model, Run(world=4)).weights == one.weights  # DDP: every process holds all of them


def test_the_summary_is_one_line_with_every_part():
    model = memory.meta_model(memory.PUBLIC["OPT-1.3B"])
    line = memory.estimate(model, Run()).summary()
    assert "\n" not in line and line.startswith("memory: weights 4.9 GiB + grads 4.9 GiB + AdamW 9.8 GiB + ")
    assert "bfloat16 weight copies" in line and "with --grad_ckpt" in line and "+ loss 0.4 GiB = " in line
    assert "without --grad_ckpt" in memory.estimate(model, Run(grad_ckpt=True)).summary()
    assert "weight copies" not in memory.estimate(model, Run(param_dtype="bfloat16")).summary()  # nothing to cast


def test_the_table_command_prints_every_model_and_choice():
    rows = memory.table()
    assert len(rows) == 2 + len(memory.PUBLIC) * len(memory.CHOICES) * 2
    assert rows[2].startswith("| OPT-125m (0.13B) | adamw | float32 | no | 16.00 |")


def test_the_documented_table_is_the_generated_one():
    """docs/memory.md shows `python memory.py --table` as the code computes it now: a change to the arithmetic (the
    chunked loss, a new optimizer) fails here until the table is regenerated."""
    doc = (ROOT / "docs" / "memory.md").read_text()
    assert "\n".join(memory.table()) in doc and "python memory.py --table" in doc


# --- train.py: the line, the refusal, the out-of-memory exit ------------------------------------------------------

def test_the_memory_line_is_printed_at_the_start_on_cpu(tiny_flags, tmp_path, capsys):
    train.main(tiny_flags + ["--out_dir", str(tmp_path / "o"), "--max_iters", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("memory: weights ") and " = " in lines[1], lines[:3]


def test_a_run_its_gpu_cannot_hold_is_refused_in_one_line_naming_flags(tiny_flags, tmp_path, monkeypatch, capsys):
    flags = tiny_flags + ["--out_dir", str(tmp_path / "o"), "--batch_size", "4", "--grad_accum", "2"]
    args = train.cli.get_args(flags)
    model = train.build_model(args, train.load_split(train.Path(args.data), "train", 32)["meta"], None)[0]
    need = memory.estimate(model, Run.from_args(args, "float32"))
    smaller = memory.estimate(model, replace(need.run, optim="adamw8bit"))
    free = int(smaller.total * (1 + memory.MARGIN)) + 1  # 8-bit moments fit, the run as asked does not
    assert not memory.fits(need, free)
    monkeypatch.setattr(runtime, "free_memory", lambda device: free)
    with pytest.raises(SystemExit) as e:
        train.main(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("train.py: error: this run needs "), err
    assert err[0].endswith(f"free: try --optim adamw8bit ({memory.size(smaller.total)} by the arithmetic)"), err
    assert not (tmp_path / "o").exists()  # refused before anything is written
    monkeypatch.setattr(runtime, "free_memory", lambda device: 10 * need.total)  # room enough: it runs
    train.main(flags + ["--max_iters", "1"])


OOM_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
import train
calls, real = [], train.forward_backward
def fails_at_step_3(*args, **kwargs):  # steps 0 and 1 train, the evaluation at step 2 checkpoints, step 2 fails
    calls.append(1)
    if len(calls) == 3:
        open({snapshot!r}, "wb").write(open({ckpt!r}, "rb").read())  # ckpt.pt as it was when memory ran out
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return real(*args, **kwargs)
train.forward_backward = fails_at_step_3
train.main(sys.argv[1:])
"""


def test_out_of_memory_in_a_step_is_one_line_exit_2_and_the_checkpoint_intact(tiny_flags, tmp_path):
    out = tmp_path / "o"
    code = OOM_SCRIPT.format(root=str(ROOT), snapshot=str(tmp_path / "snapshot"), ckpt=str(out / "ckpt.pt"))
    p = subprocess.run([sys.executable, "-c", code, *tiny_flags, "--out_dir", str(out), "--max_iters", "4",
                        "--eval_interval", "2"], capture_output=True, text=True)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr
    assert err[0].startswith("train.py: error: out of memory on cpu in training (CUDA out of memory. Tried to allocate "
                             "2.00 GiB; ") and " by the arithmetic): try --" in err[0], err
    assert err[0].endswith(f"; {out / 'ckpt.pt'}, the last checkpoint, is intact"), err
    assert (out / "ckpt.pt").read_bytes() == (tmp_path / "snapshot").read_bytes()  # nothing written after it
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2
    assert sorted(p.name for p in out.glob("ckpt*")) == ["ckpt-0000002.pt", "ckpt.pt"] and not (out / "hf").exists()



def test_a_reference_model_is_counted_in_the_memory_a_run_needs(tiny_flags, tiny_ref, tmp_path, monkeypatch, capsys):
    """--ref_model: the frozen reference's weights (param_dtype, whole on every process) are part of the need, in
    the printed line and in the refusal: a run that fits without them and not with them is refused."""
    flags = tiny_flags + ["--out_dir", str(tmp_path / "o"), "--method", "rholoss", "--keep", "0.5",
                          "--ref_model", str(tiny_ref), "--max_iters", "1"]
    args = train.cli.get_args(flags)
    meta = train.load_split(train.Path(args.data), "train", 32)["meta"]
    model, ref = train.build_model(args, meta, None)[0], train.reference.load(args, meta, None)
    alone = memory.estimate(model, Run.from_args(args, "float32"))
    need = memory.estimate(model, runtime.memory_run(args, "float32", 1, ref))
    n_ref = sum(p.numel() for p in ref.parameters())
    assert need.reference == 4 * n_ref and need.total == alone.total + 4 * n_ref  # float32 weights, nothing else
    assert f"+ reference model {memory.size(4 * n_ref)} = {memory.size(need.total)}" in need.summary()
    monkeypatch.setattr(runtime, "free_memory", lambda device: int(alone.total * (1 + memory.MARGIN)) + 1)
    with pytest.raises(SystemExit) as e:
        train.main(flags)
    assert e.value.code == 2 and "train.py: error: this run needs " in capsys.readouterr().err
    monkeypatch.setattr(runtime, "free_memory", lambda device: 10 * need.total)
    train.main(flags)
    assert "+ reference model " in capsys.readouterr().out
