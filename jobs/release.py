"""Driver job: the whole qsae pipeline, from questions to a released set of SAEs.

    python jobs/release.py                          # embedded default: local Ray, tiny model, bundled questions
    python jobs/release.py --config configs/qwen36_27b.toml --out runs/qwen36
    ray job submit --working-dir . -- python jobs/release.py --config ... key=value ...
"""
import sys

from qsae.cli import release_main

if __name__ == "__main__":
    sys.exit(release_main(sys.argv[1:]))
