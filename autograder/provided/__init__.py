"""The course's own implementations of earlier chapters' exercises, imported by later chapters' setup cells so a
later chapter never depends on the student's earlier answer; grading works without ``solutions/``."""
