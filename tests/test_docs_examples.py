"""The worked examples of docs/extending.md run and their assertions hold."""
import re
from pathlib import Path

from sbp_mmdet.sbp import MASK_POLICIES

DOC = Path(__file__).resolve().parents[1] / 'docs' / 'extending.md'


def test_extending_examples_run():
    blocks = re.findall(r'```python\n(.*?)```', DOC.read_text(), flags=re.S)
    assert len(blocks) == 4
    namespace: dict = {}
    policies = dict(MASK_POLICIES)
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f'{DOC.name}[python block {i}]', 'exec'), namespace)
    finally:  # the example registers a policy: leave the registry as it was
        MASK_POLICIES.clear()
        MASK_POLICIES.update(policies)
