import sys
from pathlib import Path

# learning tests share their small generated tasks through tests/learning/tasks.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
