//! What a stopping process waits for, so that the shutdown watchdog can say it when it gives up.

use std::sync::Mutex;

static STAGE: Mutex<String> = Mutex::new(String::new());

/// The step of the stop now under way (`settling 3 event(s) in flight`, `flushing the decision journal`).
pub fn set(what: impl Into<String>) {
    *STAGE.lock().unwrap_or_else(|e| e.into_inner()) = what.into();
}

/// The step last set (empty before the stop began).
pub fn get() -> String {
    STAGE.lock().unwrap_or_else(|e| e.into_inner()).clone()
}
