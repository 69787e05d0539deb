"""Every recipe in scripts/ parses with train_ssl.py's flags and passes its checks."""
import glob
import os
import subprocess
import sys

import pytest

from conftest import ROOT

RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, 'scripts', '*_*.sh'))
                 if not os.path.basename(p).startswith(('prepare_', 'setup', 'common')))


def test_there_are_recipes():
    assert len(RECIPES) >= 15


@pytest.mark.parametrize('path', RECIPES, ids=os.path.basename)
def test_recipe_flags_are_valid(path):
    env = {**os.environ, 'RUN': f'{sys.executable} tests/check_flags.py', 'PY': sys.executable}
    p = subprocess.run(['bash', path], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith('ok'), p.stderr[-2000:]
