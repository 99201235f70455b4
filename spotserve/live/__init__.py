"""Live backend: an mpirun-launched controller and one worker process per GPU slot."""
