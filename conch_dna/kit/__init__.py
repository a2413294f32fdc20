"""The tiny model kit the project ships: a teacher and a smaller student base sharing one tokenizer.

They are ordinary mlx-lm model directories; pass these paths wherever a model id goes.
Rebuild them with `python -m conch_dna.kit.build`.
"""

from pathlib import Path

KIT_DIR = Path(__file__).parent / "models"
TEACHER_PATH = str(KIT_DIR / "teacher")
STUDENT_PATH = str(KIT_DIR / "student")
