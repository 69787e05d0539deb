"""`python tests/check_flags.py train_ssl.py --flag ...`: parse a stage's flags and run its checks
without training (used by tests/test_scripts.py to validate every recipe in scripts/)."""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
stage = importlib.import_module(os.path.basename(sys.argv[1])[:-3])
args = stage.get_args_parser().parse_args(sys.argv[2:])
if hasattr(stage, 'check_args'):
    stage.check_args(args, world_size=1)
print('ok', args.loss if hasattr(args, 'loss') else '')
