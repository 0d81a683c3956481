"""How long the command line takes to answer (help, a refusal) against
`import ffcv` alone, each in a new process, rounds interleaved.

    .venv/bin/python benchmarks/cli_latency.py [--rounds 5]
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

FFCV_DR = os.path.join(os.path.dirname(sys.executable), 'ffcv-dr')
COMMANDS = {
    'python -c "import ffcv"': [sys.executable, '-c', 'import ffcv'],
    'ffcv-dr --help': [FFCV_DR, '--help'],
    'ffcv-dr train --help': [FFCV_DR, 'train', '--help'],
    'ffcv-dr train --show-settings': [FFCV_DR, 'train', '--show-settings'],
    'ffcv-dr convert IMAGES (refused: no OUT)': [FFCV_DR, 'convert', 'images'],
}


def seconds(argv) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--rounds', type=int, default=5)
    args = p.parse_args()
    times = {name: [] for name in COMMANDS}
    for name, argv in COMMANDS.items():
        seconds(argv)   # warm the page cache
    for _ in range(args.rounds):
        for name, argv in COMMANDS.items():
            times[name].append(seconds(argv))
    base = statistics.median(times['python -c "import ffcv"'])
    for name, t in times.items():
        median = statistics.median(t)
        print(f'{name:42s} {median:6.2f} s   {median / base:5.2f} of import ffcv')


if __name__ == '__main__':
    main()
