"""`samba-edge`: the command line. Each command is a thin layer over one public function.

Start-up imports no torch: every command imports what it needs when it runs. Bad input raises
SambaEdgeError, printed as one line with exit code 2 (a traceback only with --debug).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import click

from samba_edge.runtime.errors import SambaEdgeError

CHECKPOINT_HELP = "a checkpoint directory, an official .pth training checkpoint, or builtin:NAME"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="show full tracebacks")
@click.option("--quiet", is_flag=True, help="no progress or status lines on stderr (they show only on a terminal)")
@click.version_option(package_name="samba-edge")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """SAMBA from PyTorch checkpoints to exact inference on NVIDIA GPUs and Jetson."""
    ctx.obj = {"debug": debug}
    if quiet:
        os.environ["SAMBA_EDGE_QUIET"] = "1"             # runtime/progress.py reads it


@cli.command()
@click.argument("checkpoint", required=False)
@click.option("--config", "config", help="preset name or config JSON (alone: inspect the shape only)")
@click.option("--batch", default=1, show_default=True, help="streams, for the state-size figure")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def inspect(checkpoint: Optional[str], config: Optional[str], batch: int, as_json: bool) -> None:
    """Layer map, parameter count and per-stream recurrent state size."""
    from samba_edge.tools.inspect_model import inspect_model, render_text

    info = inspect_model(checkpoint, config, batch)
    click.echo(json.dumps(info, indent=2) if as_json else render_text(info))


@cli.command()
@click.argument("checkpoint")
@click.option("-o", "--out", required=True, help="output directory (canonical format)")
@click.option("--config", help="preset name or config JSON (needed when the checkpoint has none)")
@click.option("--tokenizer", help="a Hugging Face tokenizer.json or SentencePiece tokenizer.model (any file name: "
              "recognised by its content) or its directory; stored as tokenizer.json / tokenizer.model")
@click.option("--force", is_flag=True, help="replace an existing output directory")
def convert(checkpoint: str, out: str, config: Optional[str], tokenizer: Optional[str], force: bool) -> None:
    """Official training checkpoint -> canonical directory (config.json + model.safetensors)."""
    from samba_edge.tools.convert import convert_checkpoint

    path = convert_checkpoint(checkpoint, out, config, tokenizer, force)
    click.echo(f"wrote {path}")


@cli.command(name="eval")
@click.argument("checkpoint")
@click.option("--text", type=str, help="UTF-8 text file to score")
@click.option("--token-ids", type=str, help=".npy file of token ids (1-D int)")
@click.option("--config", help="preset name or config JSON")
@click.option("--tokenizer", help="tokenizer file or directory (default: the checkpoint's)")
@click.option("--chunk", type=int, help="feed tokens in chunks of N, carrying state "
              "(default: all at once; an artifact's max chunk)")
@click.option("--backend", default="auto", show_default=True,
              help="auto (artifact: ort; engine: trt; checkpoint: ort on its cached export, torch without "
                   "onnxruntime) | ort | torch (PyTorch eager, checkpoints) | trt (engine directory)")
@click.option("--agree-with", help="checkpoint or artifact (e.g. the fp32 export) to measure top-1 agreement with")
@click.option("--max-tokens", type=int, help="score only the first N tokens")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object: tokens, nll, ppl[, bits_per_byte]")
def eval_cmd(checkpoint: str, text: Optional[str], token_ids: Optional[str], config: Optional[str],
             tokenizer: Optional[str], chunk: Optional[int], backend: str, agree_with: Optional[str],
             max_tokens: Optional[int], as_json: bool) -> None:
    """Next-token NLL (nats), perplexity and bits per byte through the streaming path.

    CHECKPOINT may also be an exported artifact directory (run with --backend ort)."""
    from samba_edge.tools.evaluate import evaluate

    res = evaluate(checkpoint, text=text, token_ids=token_ids, config=config, chunk=chunk, tokenizer=tokenizer,
                   backend=backend, agree_with=agree_with, max_tokens=max_tokens)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))


@cli.command()
@click.argument("checkpoint")
@click.option("-o", "--out", required=True, help="artifact directory to create")
@click.option("--flavor", default="plugin", show_default=True,
              help="plugin (samba.* custom ops for TensorRT) | portable (standard ONNX ops only)")
@click.option("--config", help="preset name or config JSON (needed when the checkpoint has none)")
@click.option("--max-chunk", default=256, show_default=True, help="largest prefill chunk the graph serves")
@click.option("--opset", default=18, show_default=True, help="ONNX opset (>= 18)")
@click.option("--logits", default="all", show_default=True, help="all positions | last position only")
@click.option("--tokenizer", help="tokenizer to ship (default: the checkpoint's)")
@click.option("--dtype", default="fp32", show_default=True,
              help="fp32 | fp16 (GEMMs/weights; scan, state, norms, softmax stay fp32). INT8: `calibrate`")
@click.option("--kernel-archs", help="plugin flavour: GPU archs to compile kernels for, e.g. 87 (Orin) or 75,90 "
              "(default: all, or $SAMBA_EDGE_KERNEL_ARCHS; 75 carries the PTX newer GPUs JIT-compile)")
@click.option("--force", is_flag=True, help="replace an existing output directory")
def export(checkpoint: str, out: str, flavor: str, config: Optional[str], max_chunk: int, opset: int, logits: str,
           tokenizer: Optional[str], dtype: str, kernel_archs: Optional[str], force: bool) -> None:
    """Checkpoint -> model.onnx + manifest.json + tokenizer (one step graph, state as graph I/O)."""
    from samba_edge.export.onnx_export import export_onnx

    path = export_onnx(checkpoint, out, flavor, config, max_chunk, opset, logits, force, tokenizer, dtype,
                       kernel_archs)
    click.echo(f"wrote {path} ({flavor} flavour, {dtype})")


def _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, stop_id):
    from samba_edge.runtime import SamplingParams
    from samba_edge.tools.generate import decode_escapes

    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                          seed=seed, max_new_tokens=max_new_tokens, stop=tuple(decode_escapes(s) for s in stop),
                          stop_token_ids=tuple(stop_id))


def sampling_options(f):
    for opt in reversed([
        click.option("-n", "--max-new-tokens", default=120, show_default=True),
        click.option("--temperature", default=0.0, show_default=True, help="0 = greedy"),
        click.option("--top-k", default=0, show_default=True, help="0 = off"),
        click.option("--top-p", default=1.0, show_default=True, help="1 = off"),
        click.option("--repetition-penalty", default=1.0, show_default=True, help="1 = off"),
        click.option("--seed", type=int, help="seed for sampling (default: continue the stream's generator)"),
        click.option("--stop", multiple=True,
                     help="stop string (repeatable; not printed). Backslash escapes are decoded: "
                          "\\n \\t \\r \\\\ \\' \\\" \\xNN \\uNNNN \\UNNNNNNNN, so --stop \"\\n\\n\" "
                          "stops at a blank line; write \\\\ for a literal backslash"),
        click.option("--stop-id", multiple=True, type=int, help="stop token id (repeatable)"),
        click.option("--backend", default="auto", show_default=True,
                     help="auto (artifact: ort; engine: trt; checkpoint: ort on its cached export, torch without "
                          "onnxruntime) | ort | torch (PyTorch eager, checkpoints) | trt (engine directory)"),
        click.option("--state-in", help="continue from this snapshot"),
        click.option("--state-out", help="write the stream's snapshot here at the end (atomically)"),
    ]):
        f = opt(f)
    return f


@cli.command()
@click.argument("artifact", default="builtin:samba-tiny-py")
@click.option("-p", "--prompt", help="prompt text")
@click.option("--prompt-file", help="read the prompt from a UTF-8 file")
@click.option("--tokenizer", help="tokenizer file or directory (default: the artifact's)")
@click.option("--server", help="HOST:PORT of a Triton server's gRPC endpoint (`samba-edge serve`): generate there; "
              "ARTIFACT (or --tokenizer) then only supplies the tokenizer")
@click.option("--model", "model_name", default="samba", show_default=True, help="the served model's name (--server)")
@sampling_options
def generate(artifact, prompt, prompt_file, tokenizer, server, model_name, max_new_tokens, temperature, top_k, top_p,
             repetition_penalty, seed, stop, stop_id, backend, state_in, state_out) -> None:
    """Stream a continuation of a prompt (ARTIFACT: export dir, checkpoint or builtin:NAME)."""
    from samba_edge.tools.generate import generate as run, read_prompt

    params = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, stop_id)
    stats = run(artifact, read_prompt(prompt, prompt_file), params, backend, state_in, state_out, tokenizer,
                write=lambda piece: click.echo(piece, nl=False), server=server, model_name=model_name)
    click.echo()
    click.echo(f"[{stats['new_tokens']} tokens, {stats['decode_tok_s']:.1f} tok/s decode, "
               f"prefill {stats['prefill_s'] * 1e3:.0f} ms, backend {stats['backend']}, position {stats['position']}]",
               err=True)


@cli.command()
@click.argument("artifact", default="builtin:samba-tiny-py")
@sampling_options
def chat(artifact, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, stop_id, backend,
         state_in, state_out) -> None:
    """Keep one stream alive across turns: each stdin line is fed, a reply streams back."""
    from samba_edge.tools.generate import chat as run

    params = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop or ("\n\n",),
                       stop_id)
    run(artifact, params, backend, state_in, state_out, write=lambda s: click.echo(s, nl=False))


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SambaEdgeError(f"{what} must be comma-separated integers, got {text!r}") from None


@cli.command()
@click.argument("artifact")
@click.option("--reference", default="torch", show_default=True,
              help="torch (the checkpoint the artifact was exported from) or a CHECKPOINT")
@click.option("--backends", default="ort", show_default=True, help="comma-separated: ort, trt (needs --engine)")
@click.option("--engine", help="engine directory built from ARTIFACT (samba-edge build), for --backends trt")
@click.option("--steps", default=12, show_default=True)
@click.option("--chunks", default="1,7,64", show_default=True, help="chunk sizes, cycled over the steps")
@click.option("--batch", default=2, show_default=True)
@click.option("--atol", help="absolute tolerance (default per dtype: fp32 1e-4, fp16 2e-2, int8 0.5)")
@click.option("--rtol", help="relative tolerance (default per dtype: fp32 1e-3, fp16 2e-2, int8 0.1)")
@click.option("--check-error-stat", "error_stat",
              help="elemwise | max | mean | median (Polygraphy's; default elemwise, int8 median)")
@click.option("--bisect", is_flag=True, help="report the first block and tensor that diverge")
@click.option("--save", help="write the JSON report here (this one file only)")
@click.option("--polygraphy-dir", help="write Polygraphy's files here: inputs, reference outputs and data loader "
              "for `polygraphy run`, and every runner's RunResults (run_results.json)")
@click.option("--seed", default=0, show_default=True)
@click.option("--allow-mismatch", is_flag=True, help="compare even if the reference has other weights")
def validate(artifact, reference, backends, engine, steps, chunks, batch, atol, rtol, error_stat, bisect, save,
             polygraphy_dir, seed, allow_mismatch) -> None:
    """Step-by-step parity (logits + every state) against the PyTorch reference; exit 1 on divergence."""
    from samba_edge.tools.validate import render_text, validate as run

    tol = []
    for name, v in (("--atol", atol), ("--rtol", rtol)):
        try:
            tol.append(None if v is None else float(v))
        except ValueError:
            raise SambaEdgeError(f"{name} must be a number, got {v!r}") from None
    report = run(artifact, reference, [b for b in backends.split(",") if b], steps, _int_list(chunks, "--chunks"),
                 batch, tol[0], tol[1], bisect, save, seed, allow_mismatch, polygraphy_dir, error_stat, engine)
    click.echo(render_text(report))
    if not report["passed"]:
        sys.exit(1)


@cli.command()
@click.argument("artifact")
@click.option("--baseline", default="torch", show_default=True, type=click.Choice(["torch", "none"]),
              help="also measure the artifact's checkpoint on the PyTorch backend")
@click.option("--contexts", default="1k,4k,16k,64k", show_default=True, help="context lengths (1k = 1024 tokens)")
@click.option("--decode-tokens", default=64, show_default=True, help="single-token steps timed at each context")
@click.option("--checkpoint", help="the baseline's checkpoint "
              "(default: the artifact's source, else builtin:samba-tiny-py)")
@click.option("--threads", type=int, help="intra-op threads for every system (default: the libraries' own)")
@click.option("--json", "json_out", help="write the full result as JSON to this file")
@click.option("--plot", help="write a PNG of per-token latency and peak memory against context (needs matplotlib: "
              "pip install matplotlib; checked before the run starts)")
def bench(artifact: str, baseline: str, contexts: str, decode_tokens: int, checkpoint: Optional[str],
          threads: Optional[int], json_out: Optional[str], plot: Optional[str]) -> None:
    """Prefill/decode tok/s, per-token latency and peak RSS against context length: the artifact, its
    PyTorch checkpoint and a same-size transformer with a full KV cache, side by side."""
    from samba_edge.tools.bench import parse_contexts, render_text, run_bench

    res = run_bench(artifact, baseline=baseline, contexts=parse_contexts(contexts), decode_tokens=decode_tokens,
                    json_out=json_out, plot=plot, checkpoint=checkpoint, threads=threads)
    click.echo(render_text(res))


@cli.command()
@click.argument("export_dir")
@click.option("-o", "--out", "engine_dir", required=True, help="engine directory to create (engine.plan + engine.json)")
@click.option("--max-chunk", type=int, help="largest prefill chunk (default: the artifact's)")
@click.option("--max-batch", default=1, show_default=True, help="most streams per call")
@click.option("--workspace", help="builder workspace limit, e.g. 512M or 2G (default: TensorRT's / the target preset's)")
@click.option("--opt-level", type=int, help="builder optimisation level 0..5 (default: TensorRT's, 3)")
@click.option("--timing-cache", help="timing cache file to read and update (Jetson targets default to one in EXPORT_DIR)")
@click.option("--target", default="x86", show_default=True, type=click.Choice(["x86", "jetson-orin", "jetson-thor"]),
              help="memory presets; build on the device you deploy to")
@click.option("--plugin-route", default="auto", show_default=True, type=click.Choice(["auto", "python", "aot"]),
              help="plugin flavour: python (IPluginV3, runs in samba-edge's runtime) | aot (tensorrt.plugin "
                   "aot_impl, TensorRT >= 10.9: the engine runs in trtexec/C++) | auto (aot where available)")
@click.option("--verbose", is_flag=True, help="TensorRT's verbose log on stderr (plugin lookup, tactics, enqueue timing)")
@click.option("--force", is_flag=True, help="replace an existing engine directory")
def build(export_dir: str, engine_dir: str, max_chunk: Optional[int], max_batch: int, workspace: Optional[str],
          opt_level: Optional[int], timing_cache: Optional[str], target: str, plugin_route: str, verbose: bool,
          force: bool) -> None:
    """Exported artifact -> TensorRT engine (decode + prefill profiles), with TensorRT or TensorRT-RTX."""
    from samba_edge.tools.build_engine import build_engine

    path = build_engine(export_dir, engine_dir, max_chunk=max_chunk, max_batch=max_batch, workspace=workspace,
                        opt_level=opt_level, timing_cache=timing_cache, target=target, force=force,
                        plugin_route=plugin_route, verbose=verbose)
    click.echo(f"wrote {path}")


@cli.command()
@click.argument("export_dir")
@click.option("-o", "--out", required=True, help="INT8 artifact directory to create")
@click.option("--text", "texts", multiple=True, help="UTF-8 calibration text (repeatable)")
@click.option("--token-ids", help=".npy file of token ids (1-D int) instead of text")
@click.option("--samples", default=64, show_default=True, help="calibration chunks (one stream, state carried)")
@click.option("--chunk", type=int, help="tokens per calibration chunk (default: 128 or the artifact's max chunk)")
@click.option("--method", default="percentile", show_default=True,
              help="activation range: max | entropy | percentile (docs/precision.md compares them)")
@click.option("--percentile", default=99.99, show_default=True, help="for --method percentile")
@click.option("--quantize-head/--fp32-head", default=True, show_default=True,
              help="quantise the output head too (a tied head gets its own int8 copy; the embedding stays fp32): "
                   "q8_0's bytes per token, +0.06% perplexity (docs/precision.md); --fp32-head keeps it fp32")
@click.option("--exclude", multiple=True, help="keep GEMMs whose label matches this glob in fp32 (repeatable; "
              "labels look like h.0.attn.in_proj, h.0.attn.dt_proj, h.1.attn.qkv, h.1.attn.proj, h.2.mlp.w3)")
@click.option("--force", is_flag=True, help="replace an existing output directory")
def calibrate(export_dir: str, out: str, texts: tuple, token_ids: Optional[str], samples: int, chunk: Optional[int],
              method: str, percentile: float, quantize_head: bool, exclude: tuple, force: bool) -> None:
    """fp32 artifact + real text -> INT8 Q/DQ artifact (W8A8 GEMMs; scan, conv, norms, state fp32)."""
    from samba_edge.calibration.int8 import calibrate as run

    rec = run(export_dir, out, texts, token_ids, samples=samples, chunk=chunk, method=method, percentile=percentile,
              include_head=quantize_head, exclude=exclude, force=force)
    click.echo(f"wrote {out} (int8: {len(rec['quantized'])} GEMMs, {len(rec['kept_fp32'])} kept fp32; "
               f"{method} calibration on {rec['tokens']} tokens)")


@cli.command()
@click.argument("source")
@click.option("-o", "--out", required=True, help="the model repository (created if missing; other models are kept)")
@click.option("--name", default="samba", show_default=True, help="the model's name in the repository")
@click.option("--backend", "triton_backend", default="python", show_default=True,
              help="python (the samba-edge runtime in Triton's python backend: ORT either flavour, or an engine "
                   "with any plugin route) | onnxruntime | tensorrt (the serving graph, implicit state)")
@click.option("--max-batch", default=8, show_default=True, help="sequences per batch")
@click.option("--instances", default=1, show_default=True, help="model instances")
@click.option("--idle-seconds", default=60.0, show_default=True, help="a sequence without requests for this long "
              "is dropped")
@click.option("--sampling", default="server", show_default=True,
              help="server (every answer carries the next token; python: the request's settings, the graphs: "
                   "greedy) | client (logits only)")
@click.option("--threads", type=int, help="python backend: ONNX Runtime threads per instance")
@click.option("--queue-delay-ms", type=float, help="how long a batch waits for more sequences (default: 5% of a "
              "decode step estimated from the weights' size, 0.5-10 ms)")
@click.option("--force", is_flag=True, help="replace the model if the repository has it")
def triton(source, out, name, triton_backend, max_batch, instances, idle_seconds, sampling, threads, queue_delay_ms,
           force) -> None:
    """Artifact or engine -> a Triton Inference Server model repository (sequence batcher, state per sequence)."""
    from samba_edge.tools.triton_repo import write_repository

    path = write_repository(source, out, name, triton_backend, max_batch, instances, idle_seconds, sampling,
                            threads, force, queue_delay_ms)
    click.echo(f"wrote {path} ({triton_backend} backend); serve it with `samba-edge serve {out}`")


@cli.command()
@click.argument("repo", required=False)
@click.option("--setup", is_flag=True, help="create the server environment (a venv with samba-edge[serve]) and exit")
@click.option("--grpc-port", default=8001, show_default=True)
@click.option("--http-port", default=8000, show_default=True)
@click.option("--metrics-port", default=8002, show_default=True)
@click.option("--server-env", help="the Python environment with samba-edge[serve] (default: $SAMBA_EDGE_TRITON_ENV, "
              "else ~/.cache/samba-edge/triton-env, else tritonserver on PATH)")
def serve(repo, setup, grpc_port, http_port, metrics_port, server_env) -> None:
    """Run Triton Inference Server on a model repository (127.0.0.1), streaming its log; Ctrl-C stops it."""
    from samba_edge.tools.serve import serve as run, setup_server_env

    if setup:
        click.echo(f"ready: {setup_server_env(server_env)}")
        return
    if not repo:
        raise SambaEdgeError("give the model repository to serve (REPO), or --setup")
    sys.exit(run(repo, grpc_port, http_port, metrics_port, server_env))


@cli.command()
@click.argument("artifact", required=False)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def doctor(artifact: Optional[str], as_json: bool) -> None:
    """TensorRT, CUDA driver, GPU, plugins and kernels on this machine (and ARTIFACT's kernels)."""
    from samba_edge.tools.doctor import render_text, run_doctor

    report = run_doctor(artifact)
    click.echo(json.dumps(report, indent=2) if as_json else render_text(report))


def _finish(code: int = 0) -> None:
    """The console script's exit. PyTorch's interpreter teardown takes 0.5-1 s after the last token has
    been printed; a finished command has closed its files and progress bars, so when torch was loaded we
    flush and leave at once."""
    if "torch" not in sys.modules:
        sys.exit(code)
    import logging

    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):           # a closed pipe (`| head`): nothing left to say
            pass
    os._exit(code)


def entry() -> None:
    """`samba-edge` (the console script): main() with clean-up on SIGTERM and the fast exit."""
    from samba_edge.runtime.atomic import exit_cleanly_on_sigterm

    exit_cleanly_on_sigterm()
    try:
        main()
    except SystemExit as e:
        _finish(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
    _finish(0)


def main(argv: Optional[list[str]] = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="samba-edge", standalone_mode=False)
    except SambaEdgeError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:                  # usage errors: one line, exit 2
        if debug:
            raise
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - last resort: one line, never a silent failure
        if debug:
            raise
        click.echo(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    entry()
