"""Command line: argument parsing, and nothing else."""
from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


def _positive(name):
    def parse(s):
        v = int(s)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {v}")
        return v
    return parse


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit status 2 (subcommands inherit this class)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"pt2llm: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pt2llm", description="Post-training ternarization of causal LMs (PT²-LLM).")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model's decoder linears and save the result",
                       description="Quantize every decoder linear layer of MODEL, layer by layer (GPTQ framework), "
                                   "and write a loadable folder.")
    q.add_argument("model", metavar="MODEL", help="hub id, local HF folder, .gguf file, or demo alias "
                   "(smollm2-135m, qwen2.5-coder-0.5b)")
    q.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists (only once the new one is complete); start over even if an "
                        "interrupted run left finished layers")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from its last finished layer "
                        "(kept in .OUT.work beside --out); the result is byte-identical to an uninterrupted run")
    q.add_argument("--method", default="pt2", choices=["pt2", "rtn", "gptq"],
                   help="pt2: PT²-LLM ternary (default); rtn: TWN ternary per block, no data; gptq: uniform int-k GPTQ")
    q.add_argument("--bits", type=int, default=2, help="code bits for --method gptq (2..8, default 2)")
    q.add_argument("--block-size", type=_positive("--block-size"), default=128,
                   help="columns per block sharing one (alpha, mu) per row (default 128)")
    q.add_argument("--no-itf", action="store_true", help="skip Iterative Ternary Fitting (ablation)")
    q.add_argument("--no-aga", action="store_true", help="skip Activation-aware Grid Alignment (ablation)")
    q.add_argument("--max-iters", type=_positive("--max-iters"), default=50, help="ITF iteration cap (default 50)")
    q.add_argument("--reorder", choices=["ssr", "hessian", "random", "none"], default=None,
                   help="column order: ssr (default for pt2), hessian (GPTQ act-order), random, none (default for rtn/gptq)")
    q.add_argument("--rotate", choices=["none", "hadamard"], default="none",
                   help="hadamard: rotate the float model first (random Hadamard on the residual stream, value "
                        "heads and down_proj's input; exact in float) so weights and activations are incoherent; "
                        "down_proj then applies a fast online Hadamard at run time (default none)")
    q.add_argument("--target", choices=["quantized", "float", "residual"], default="quantized",
                   help="what each linear is fitted to: quantized = its float weight on the inputs the quantized "
                        "layers before it produce (GPTQ, the paper; default); float = the float model's outputs "
                        "on its own float inputs (asymmetric calibration: a second, float forward stream); "
                        "residual = float, and o_proj / down_proj also cancel what they can of the drift "
                        "between the float and the quantized residual stream (Llama-style layers)")
    q.add_argument("--refine", type=int, default=0, metavar="N",
                   help="after GPTQ, N sweeps alternating the joint (alpha, mu) of all blocks of a row with "
                        "coordinate descent on the codes, both in the layer's output error (beyond the paper; "
                        "default 0: off)")
    q.add_argument("--fit-head", action="store_true",
                   help="with --target float / residual: at the end, refit the 16-bit lm_head by least squares "
                        "so that its logits on the quantized model's final hidden states match the float "
                        "model's on the calibration windows (beyond the paper; a tied lm_head is untied, "
                        "which stores it apart from the embeddings)")
    q.add_argument("--calib", default="c4", help="c4 | wikitext2 | ptb | PATH to a text file | synthetic (default c4)")
    q.add_argument("--nsamples", type=_positive("--nsamples"), default=128, help="calibration windows (default 128)")
    q.add_argument("--seqlen", type=_positive("--seqlen"), default=2048, help="tokens per window (default 2048)")
    q.add_argument("--seed", type=int, default=0, help="seed for calibration windows and random orders (default 0)")
    q.add_argument("--percdamp", type=float, default=None,
                   help="Hessian damping, fraction of mean diag (default 0.01, the paper's; 0.1 with --target "
                        "float or residual)")
    q.add_argument("--target-damp", type=float, default=None, metavar="F",
                   help="with --target float / residual: damping of the target's own solve W* = W + (W D + P)"
                        "(H + F mean(diag H) I)^-1, apart from GPTQ's --percdamp (default: --percdamp's value)")
    q.add_argument("--device", default=None, help="compute device: cpu | cuda | cuda:N (default: cuda if available)")
    q.add_argument("--devices", default=None, metavar="LIST",
                   help="spread the work over several GPUs, one process each, e.g. cuda:0,cuda:1 (cpu,cpu for "
                        "testing); byte-identical to one device of the same type. Under torchrun each process "
                        "takes cuda:LOCAL_RANK (or its entry of this list)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.add_argument("--report", metavar="FILE", help="write wall time, per-stage seconds and peak memory as JSON")

    r = sub.add_parser("rotate", help="write the Hadamard-rotated float model (same outputs; for checking)",
                       description="Fold the RMSNorm weights into the linears that read them and rotate the model "
                                   "with random Hadamard matrices (what quantize --rotate hadamard does before "
                                   "quantizing). The folder loads with the pt2llm commands (eval, generate, "
                                   "quantize), which rebuild down_proj's online transform.")
    r.add_argument("model", metavar="MODEL", help="hub id, local HF folder, .gguf file, or demo alias")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    r.add_argument("--seed", type=int, default=0, help="seed of the random signs (default 0)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    g = sub.add_parser("generate", help="generate text from a model (greedy, or sampled with --temperature)")
    g.add_argument("model", metavar="DIR_OR_MODEL", help="a quantized folder, or any MODEL that quantize accepts")
    g.add_argument("prompt", help="text to continue")
    g.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=64,
                   help="tokens to generate (default 64)")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (faster tokens after a compilation of about a minute)")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as a user's message in the model's chat template and print only the reply")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (default 0: greedy, the most likely token each step)")
    g.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely tokens (default 0: off)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="sample only from the most likely tokens that together hold this probability "
                        "(nucleus sampling; default 1: off)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="sample only from tokens at least this fraction as likely as the most likely one "
                        "(default 0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the positive logits (multiply the negative ones) of tokens already in the text "
                        "by this, greedy or sampled (transformers' rule; default 1: off, 1.1-1.3 curbs loops)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the text once it holds TEXT (kept in the output); may be given more than once")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0); the same seed, the same text")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")

    i = sub.add_parser("inspect", help="bits per weight, size and a per-layer table of a quantized folder")
    i.add_argument("dir", metavar="DIR", help="a folder written by pt2llm quantize")
    i.add_argument("--json", metavar="FILE", help="also write the report as JSON")

    e = sub.add_parser("eval", help="perplexity (GPTQ protocol) and zero-shot tasks (lm-eval) of one or more models",
                       description="Perplexity by GPTQ's protocol: non-overlapping windows of --seqlen tokens over "
                                   "the whole test text, exp of the mean token NLL. Zero-shot tasks are scored by "
                                   "lm-evaluation-harness on the local files under $PT2LLM_DATA_DIR.")
    e.add_argument("models", nargs="+", metavar="MODEL_OR_DIR", help="float models or quantized folders, compared side by side")
    e.add_argument("--ppl", default=None,
                   help="comma-separated: wikitext2, c4, ptb, or 'none' (default wikitext2,c4; none when --tasks is given)")
    e.add_argument("--tasks", default=None,
                   help="comma-separated zero-shot tasks: piqa, arc_easy, arc_challenge, hellaswag, winogrande, "
                        "boolq, openbookqa, or 'all' (the seven; needs pip install 'pt2llm[eval]')")
    e.add_argument("--limit", type=_positive("--limit"), default=None,
                   help="score only the first N documents of each task (quick checks; not comparable to full runs)")
    e.add_argument("--batch-size", type=_positive("--batch-size"), default=32, help="zero-shot batch size (default 32)")
    e.add_argument("--seqlen", type=_positive("--seqlen"), default=2048, help="tokens per window (default 2048)")
    e.add_argument("--limit-windows", type=_positive("--limit-windows"), default=None,
                   help="score only the first N windows of each set (quick checks; not comparable to full runs)")
    e.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    e.add_argument("--json", metavar="FILE", help="write the results as JSON")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")

    b = sub.add_parser("bench", help="prefill and decode tokens/s and GPU memory of a model (CUDA)",
                       description="Time a forward pass over the prompt (prefill) and greedy decoding one token "
                                   "at a time into a static KV cache, replayed as a CUDA graph; random prompt tokens.")
    b.add_argument("model", metavar="MODEL_OR_DIR", help="a quantized folder, or any MODEL that quantize accepts")
    b.add_argument("--prompt-len", type=_positive("--prompt-len"), default=128, help="prompt tokens (default 128)")
    b.add_argument("--new-tokens", type=_positive("--new-tokens"), default=256, help="tokens to decode (default 256)")
    b.add_argument("--batch", type=_positive("--batch"), default=1, help="sequences at once (default 1)")
    b.add_argument("--no-graphs", action="store_true", help="decode eagerly, without a CUDA graph")
    b.add_argument("--compile", action="store_true",
                   help="run the decode step through torch.compile first (fuses the small kernels between "
                        "the linears; compiling takes a minute or more)")
    b.add_argument("--attention", choices=["pt2llm", "model"], default="pt2llm",
                   help="decode-step attention: pt2llm's split-key Triton kernel (default) or the model's own "
                        "(transformers' SDPA)")
    b.add_argument("--device", default=None, help="cuda | cuda:N (default: cuda)")
    b.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import commands
    try:
        return getattr(commands, args.cmd)(args)
    except KeyboardInterrupt:
        print("pt2llm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if args.debug or not commands.is_user_error(e):
            raise
        print(f"pt2llm: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
