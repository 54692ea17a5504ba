import os
import sys

# The project is a set of flat scripts (as MAE): make the repository root importable however pytest is started.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
