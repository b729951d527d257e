"""Long sequences (a video, or many photos in order): planning overlapping chunks, aligning
each chunk to the one before by a robust Sim(3), and the chunked pipeline the service runs
(docs/ARCHITECTURE.md "Sequences")."""
