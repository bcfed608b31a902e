"""Models and the maths of training them: objectives, perturbations, precision, privacy."""
