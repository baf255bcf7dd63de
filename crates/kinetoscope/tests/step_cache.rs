//! Step caching on the small model: a threshold no step passes changes nothing, bit for bit; a threshold
//! every step passes reuses all the steps the rule allows and still gives a finite video; bad thresholds are
//! refused by name.

mod common;

use common::{model_dir, reference_request};
use kinetoscope::{Error, GenerateRequest, LoadOptions, Pipeline};

const STEPS: usize = 6;

fn request(step_cache: Option<f64>, guidance_scale: f64) -> GenerateRequest {
    GenerateRequest { steps: STEPS, seed: 3, step_cache, guidance_scale, ..reference_request("wan21-tiny-a") }
}

#[test]
fn threshold_zero_is_the_uncached_run_and_a_large_one_reuses_steps() {
    let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    // With guidance (a batch of two, cached as one) and without.
    for guidance in [5.0, 1.0] {
        let uncached = pipeline.generate(&request(None, guidance)).unwrap();
        assert_eq!(uncached.timings.cached_steps, 0);

        let zero = pipeline.generate(&request(Some(0.0), guidance)).unwrap();
        assert_eq!(zero.timings.cached_steps, 0);
        assert!(zero.frames == uncached.frames, "guidance {guidance}: threshold 0 changed the frames");

        let mut reused = Vec::new();
        let large = pipeline
            .generate_with_progress(&request(Some(1e9), guidance), &mut |p| {
                reused.push(p.cached);
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        // Every step but the first two and the last.
        assert_eq!(reused, [false, false, true, true, true, false], "guidance {guidance}");
        assert_eq!(large.timings.cached_steps, STEPS - 3);
        assert!(large.frames.iter().all(|x| x.is_finite()));
        assert!(large.frames != uncached.frames, "guidance {guidance}: reusing steps should change the frames");
    }
}

#[test]
fn bad_thresholds_are_refused_by_name() {
    let pipeline = Pipeline::load(&model_dir("wan21-tiny-a"), &LoadOptions::default()).unwrap();
    for bad in [-0.1, f64::NAN, f64::INFINITY] {
        match pipeline.validate(&request(Some(bad), 5.0)) {
            Err(Error::InvalidRequest { field: "step_cache", reason }) => assert!(reason.contains("≥ 0"), "{reason}"),
            other => panic!("step_cache {bad}: {other:?}"),
        }
    }
}
