"""Reading a chat answer with a huge ``top_logprobs`` list (issue 23): the list is cut to
the size asked for before anything else is done with it.

One synthetic chat completion whose first position lists ``--entries`` alternatives is
parsed and learned (:class:`~blackbox_vqa.adapters.http.openai.ChatFormat` ``.parse``, then
:class:`~blackbox_vqa.adapters.http.openai.ChatVocabulary` ``.learn``) with
``top_logprobs=20`` (what the adapter asks for) and with ``top_logprobs=entries`` (every
entry read: the work the adapter did before the cut, minus its quadratic membership test,
which made it far slower still). Both run side by side in one process, alternating, and
the figures are medians over ``--repeats``. JSON decoding of the body (the same in both)
is timed apart and included.

Run ``python benchmarks/chat_answers.py --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from blackbox_vqa.adapters.http.openai import ChatFormat, ChatVocabulary


def body(entries: int) -> bytes:
    """A chat completion listing ``entries`` alternatives at its first position."""
    alternatives = [{"token": f"t{i}", "logprob": -1.0 - i / 1e6} for i in range(entries)]
    return json.dumps({"model": "m", "choices": [{"message": {"content": "Yes."}, "logprobs": {
        "content": [{"token": "Yes", "logprob": -0.1, "top_logprobs": alternatives}]}}]}
    ).encode()


def read(content: bytes, top: int) -> tuple[float, int]:
    """Seconds to parse and learn one answer, and the columns learned."""
    start = time.perf_counter()
    (answer,) = ChatFormat("m", top_logprobs=top).parse(content, "application/json", 1)
    vocabulary = ChatVocabulary()
    vocabulary.learn(answer)
    return time.perf_counter() - start, len(vocabulary.names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=80_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    content = body(args.entries)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; body {len(content) / 2**20:.1f} MiB, "
          f"{args.entries} entries")
    times: dict[int, list[float]] = {20: [], args.entries: []}
    columns: dict[int, int] = {}
    decode = []
    for i in range(args.repeats):
        start = time.perf_counter()
        json.loads(content)
        decode.append(time.perf_counter() - start)
        for top in (20, args.entries) if i % 2 == 0 else (args.entries, 20):
            seconds, columns[top] = read(content, top)
            times[top].append(seconds)
    print(f"json.loads alone: median {statistics.median(decode):.3f} s")
    for top, found in times.items():
        print(f"top_logprobs={top}: median {statistics.median(found):.3f} s "
              f"({', '.join(f'{t:.3f}' for t in found)}), {columns[top]} columns")
    ratio = statistics.median(times[args.entries]) / statistics.median(times[20])
    print(f"reading every entry / reading 20: {ratio:.1f}x")


if __name__ == "__main__":
    main()
