"""A training run: building it and its loop.

    build.read_inputs / build_trainer   check every input, then build the run (train.py and scripts/bench.py)
    loop.Trainer                        the loop object: counters, state_dict, the event path to its parts
    setup                               accelerator, data-loader workers, models made ready to train, compile
    memory                              the memory plan: the means that fit the GPU, and the peak estimate
    epoch_data.EpochData                each epoch's batch plan and loaders
    checkpointer.Checkpointer           every save (timed, epoch, interrupt, error, final)
    checkpoint, training_state          atomic writes, names, findlast; the resumable state file
    interrupts, run_dir                 SIGINT/SIGTERM and divergence; the run's log folder
    live_settings, reflow, plugin_hooks parts and phases of the loop
"""
