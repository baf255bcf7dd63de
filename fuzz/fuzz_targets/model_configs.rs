//! The JSON configs of a model folder, as the loader reads them: the input's first byte picks the file of
//! the tiny test model to replace (model_index.json, the scheduler's, umT5's, the transformer's or the
//! VAE's config), the rest is its content. `kinetoscope::verify` parses and validates every config and
//! builds each network over the weight headers, which is where absurd sizes would allocate or panic; the
//! scheduler config is also built into a schedule, as a generation does.

#![no_main]

use kinetoscope::scheduler::SchedulerConfig;
use kinetoscope_fuzz::ScratchModel;
use libfuzzer_sys::fuzz_target;

const CONFIGS: [&str; 5] = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "transformer/config.json",
    "vae/config.json",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, content)) = data.split_first() else { return };
    let rel = CONFIGS[usize::from(pick) % CONFIGS.len()];
    ScratchModel::get().with_file(rel, content, |model| {
        let _ = kinetoscope::verify(model);
        let _ = model.identity();
        if let Ok(scheduler) = model.config::<SchedulerConfig>("scheduler", "scheduler_config.json") {
            let path = model.component("scheduler").join("scheduler_config.json");
            if scheduler.validate(&path).is_ok() {
                let schedule = scheduler.build(None, 4, None, None, kinetoscope::scheduler::Renoise::Seeded(0));
                assert_eq!(schedule.sigmas().len(), schedule.timesteps().len() + 1);
            }
        }
    });
});
