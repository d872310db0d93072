"""Append the block-tuning lines of `methods_table.py --log` runs to benchmarks/results/block_tuning_losses.md.

    python benchmarks/append_tuning_losses.py /tmp/run1.log [/tmp/run2.log ...]

One section per log: the cell's label and perplexity, then each block's `abqllm.methods.block_tuning` line as
logged. Not part of the test run.
"""
import re
import sys

HEAD = re.compile(r"^(abq\+gptq \(.*?\) \S+): ppl ([0-9.]+)", re.M)
LINE = re.compile(r"abqllm\.methods\.block_tuning (block \d+: .*)")


def main():
    with open("benchmarks/results/block_tuning_losses.md", "a") as out:
        for log in sys.argv[1:]:
            text = open(log, errors="replace").read()
            head = HEAD.search(text)
            if head is None:
                raise SystemExit(f"{log}: no finished methods_table cell in it (no 'abq+gptq (...) CONFIG: ppl' line)")
            out.write(f"\n## {head[1]}: ppl {head[2]}\n\n```\n" + "\n".join(LINE.findall(text)) + "\n```\n")
            print("appended", head[1])


if __name__ == "__main__":
    main()
