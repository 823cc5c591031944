"""Sample text from an export, or quiz it on the synthetic fact probes.

python tools/generate.py EXPORT_DIR --prompt "The capital of" --max-new-tokens 32 [--temperature 0.8 --top-p 0.9 --seed 1]
    [--repetition-penalty 1.2 --no-repeat-ngram-size 3]
python tools/generate.py EXPORT_DIR --probes 50 [--new-facts]
python tools/generate.py EXPORT_DIR --prompt ""     # unconditional: from the document separator alone

One of --prompt and --probes is required (without either, a forgotten --prompt would pass for an
unconditional sample).

--probes asks the trained facts, as the training run's fact recall does; --new-facts asks the
facts held out of pretraining instead (what sparse memory finetuning teaches). An option that would
change nothing is refused: --top-p and --seed at --temperature 0 (greedy), sampling and generation
options beside --probes (answered greedily, each to its answer's length), --probes-dir and --new-facts
without --probes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.cli import (  # noqa: E402
    ends_quietly_when_the_reader_stops,
    fraction,
    int_at_least,
    non_negative_number,
    positive_int,
    positive_number,
    torch_device,
)

positive_float = positive_number("1.0 = off")
non_negative_int = int_at_least(0, "0 = off")
MAX_NEW_TOKENS = 32


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", help="a folder written by tools/export.py")
    parser.add_argument(
        "--prompt",
        default=None,
        help='text to continue ("" samples unconditionally, after the document separator alone); "</s>" in it '
        "is the document separator, as in the HF tokenizer",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int_at_least(0),
        default=None,
        help=f"tokens to generate after --prompt (default {MAX_NEW_TOKENS})",
    )
    parser.add_argument("--temperature", type=non_negative_number("0 = greedy"), default=0.0, help="0 = greedy")
    parser.add_argument(
        "--top-p",
        type=fraction("1 = no nucleus cut", "probability mass"),
        default=1.0,
        help="nucleus sampling mass (with --temperature > 0; refused at 0)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=positive_float,
        default=1.0,
        help="divide the logits of tokens already in the sequence by this (> 0; 1.0 = off; CTRL/transformers)",
    )
    parser.add_argument(
        "--no-repeat-ngram-size",
        type=non_negative_int,
        default=0,
        help="never repeat an n-gram of this size, prompt included (>= 0; 0 = off; as in transformers)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the draws of --temperature > 0 sampling (default 0; refused at 0)",
    )
    parser.add_argument(
        "--probes", type=positive_int, default=None, help="answer the first N fact probes (N >= 1) and print accuracy"
    )
    parser.add_argument(
        "--new-facts",
        action="store_true",
        help="with --probes: ask the new facts (held out of pretraining) instead of the trained ones",
    )
    parser.add_argument(
        "--probes-dir",
        default=None,
        help="folder holding probes.jsonl (default: the export; or the embedded dataset folder)",
    )
    parser.add_argument("--device", type=torch_device, default="cpu", help="cpu, or cuda / cuda:N")
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute the whole sequence each step (slow; --prompt generation)"
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The options, with each combination that would change nothing refused (`_refuse_idle_options`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _refuse_idle_options(parser, args)
    return args


def _refuse_idle_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error for an option that would change nothing where it was given: sampling and
    generation options beside --probes, --new-facts or --probes-dir without it, --top-p or --seed
    at --temperature 0 (greedy); and for neither --prompt nor --probes (nothing asked)."""
    if args.probes:  # probes are answered greedily: a sampling option would be silently ignored
        sampling = {
            "--temperature": args.temperature != 0.0,
            "--top-p": args.top_p != 1.0,
            "--repetition-penalty": args.repetition_penalty != 1.0,
            "--no-repeat-ngram-size": args.no_repeat_ngram_size != 0,
            "--seed": args.seed is not None,
        }
        if any(sampling.values()):
            given = ", ".join(option for option, set_ in sampling.items() if set_)
            parser.error(f"{given}: sampling options apply to --prompt generation, not --probes (answered greedily)")
        if args.prompt is not None:  # was ignored: the probes' questions are the prompts
            parser.error("--prompt and --probes: --probes asks the probes' own questions; give one of the two")
        generation = {"--max-new-tokens": args.max_new_tokens is not None, "--no-cache": args.no_cache}
        if any(generation.values()):  # were ignored: each answer is generated to its own length, cached
            options = [option for option, set_ in generation.items() if set_]
            given, verb, them = (
                (" and ".join(options), "apply", "them") if len(options) > 1 else (options[0], "applies", "it")
            )
            parser.error(
                f"{given} {verb} to --prompt generation only: --probes generates each probe's answer to the "
                f"answer's length, with the cache; drop {them}"
            )
    elif args.new_facts:
        parser.error("--new-facts selects which fact probes --probes asks: give --probes N with it")
    elif args.probes_dir is not None:  # was ignored without --probes
        parser.error("--probes-dir names where --probes reads probes.jsonl: give --probes N with it")
    elif args.prompt is None:  # sampled from the separator alone, silently
        parser.error(
            "give --prompt TEXT to continue, or --probes N to quiz the model on the fact probes "
            '(--prompt "" samples unconditionally, from the document separator alone)'
        )
    elif args.temperature == 0.0 and args.top_p != 1.0:  # greedy: the nucleus cut would change nothing
        parser.error(
            f"--top-p {args.top_p}: --top-p applies to sampling (--temperature > 0); at --temperature 0 "
            "(greedy, the default) the most likely token is taken: give --temperature or drop --top-p"
        )
    elif args.temperature == 0.0 and args.seed is not None:  # greedy draws nothing: the seed changes nothing
        parser.error(
            f"--seed {args.seed}: the seed draws the samples of --temperature > 0; at --temperature 0 (greedy, "
            "the default) nothing is drawn: give --temperature or drop --seed"
        )


@ends_quietly_when_the_reader_stops
def main(argv=None) -> int:
    args = parse_args(argv)
    max_new_tokens = MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens

    from pretrain.data import DataError
    from pretrain.export.errors import ExportError
    from pretrain.export.folders import export_tokenizer_path

    export_dir = Path(args.export_dir)
    try:
        export_tokenizer_path(export_dir)  # a missing or wrong folder refused before torch is imported
        from pretrain.export import load
        from pretrain.export.generation import answer_probes, check_length, check_sampling, generate
        from pretrain.export.loading import export_probes, export_tokenizer, model_config_from_json

        tokenizer = export_tokenizer(export_dir)
        # read as the export's Hugging Face tokenizer reads it: "</s>" is the document separator's id
        text_ids = tokenizer.encode_with_special_tokens(args.prompt or "")
        # a prompt starts after one separator, as training documents do: "</s>Alice" already has it
        prompt = text_ids if text_ids[:1] == [tokenizer.eos_id] else [tokenizer.eos_id] + text_ids
        kind = "new-fact" if args.new_facts else "trained-fact"
        if args.probes:  # read before the weights load
            probes_dir = args.probes_dir or export_dir
            # the training run's fact recall asks only the trained facts: the new facts were held out
            probes = [p for p in export_probes(export_dir, args.probes_dir) if p.is_new_fact == args.new_facts]
            probes = probes[: args.probes]
            if not probes:
                other = "without --new-facts" if args.new_facts else "with --new-facts"
                raise DataError(f"{probes_dir}/probes.jsonl holds no {kind} probe: ask the others {other}")
        else:  # refused before the weights load
            check_sampling(args.temperature, args.top_p)
            if (export_dir / "config.json").is_file():
                max_seq_len = model_config_from_json(export_dir / "config.json").max_seq_len
                check_length(len(prompt), max_new_tokens, max_seq_len)
        model = load(export_dir, device=args.device)
        if args.probes:
            result = answer_probes(model, tokenizer, probes)
            for row in result["rows"]:
                mark = "ok " if row["correct"] else "   "
                print(f"{mark} {row['question']} -> {row['generated']!r} (answer {row['answer']!r})")
            print(
                f"accuracy {result['accuracy']:.3f} on {result['count']} {kind} probes (chance {result['chance']:.3f})"
            )
            return 0
        ids = generate(
            model,
            prompt,
            max_new_tokens,
            args.temperature,
            args.top_p,
            eos_id=tokenizer.eos_id,
            seed=args.seed or 0,
            use_cache=not args.no_cache,
            repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
        )
        # decoded together: a continuation's first piece may carry the space that starts a new word
        print(tokenizer.decode_with_special_tokens(text_ids + ids))  # an added start token is not the prompt's
    except (ExportError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
