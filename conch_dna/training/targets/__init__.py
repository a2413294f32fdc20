"""What the student learns from: the teacher's top-k targets and their cache on disk, packed small, and
several teachers' targets mixed."""
