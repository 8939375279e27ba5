"""mrisr: 3D brain MRI super-resolution (Wang et al. 2020) as a command-line tool."""

__version__ = "0.1.0"
