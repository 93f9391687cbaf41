"""The worked examples of docs/extending.md run and their assertions hold."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / 'docs' / 'extending.md'


def test_extending_examples_run():
    blocks = re.findall(r'```python\n(.*?)```', DOC.read_text(), flags=re.S)
    assert len(blocks) == 4
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f'{DOC.name}[python block {i}]', 'exec'), namespace)
