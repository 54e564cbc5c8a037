"""Networks. They map (x_in, c_noise, **cond) to a prediction and know nothing about noise schedules."""
