"""The job image: the in-container runner and the code package format."""
