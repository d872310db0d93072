"""Merge methods-table caches written elsewhere (`methods_table.py --out DIR`, e.g. parallel runs in /tmp)
into benchmarks/results/methods_<model>.json and rebuild its markdown. Cells already there are kept
unless --replace. Not part of the test run.

    python benchmarks/merge_methods.py /tmp/run1 /tmp/run2
"""
import argparse
import json
from pathlib import Path

from methods_table import write_markdown


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--into", default="benchmarks/results")
    ap.add_argument("--replace", action="store_true")
    a = ap.parse_args()
    target = Path(a.into) / f"methods_{a.model}.json"
    cache = json.loads(target.read_text())
    for d in a.dirs:
        src = json.loads((Path(d) / f"methods_{a.model}.json").read_text())["results"]
        for key, res in src.items():
            if key.startswith("float|"):
                known = cache["results"].get(key)
                if known is not None and abs(known["ppl"] - res["ppl"]) > 1e-4 * known["ppl"]:  # summation order: ~1e-5
                    raise SystemExit(f"{d}: float perplexity {res['ppl']} differs from {known['ppl']}; not merged")
                cache["results"].setdefault(key, res)
            elif a.replace or key not in cache["results"]:
                cache["results"][key] = res
                print("merged", key, round(res["ppl"], 3))
    target.write_text(json.dumps(cache, indent=1))
    write_markdown(cache, target.with_suffix(".md"))


if __name__ == "__main__":
    main()
