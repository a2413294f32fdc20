"""What everything stands on: the fast BLAS, the MLX thread, power, file watching, the data-parallel
group, private files, the home's layout and the domain names."""
