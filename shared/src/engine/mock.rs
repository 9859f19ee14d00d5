//! Mocked tasks in the AWS Step Functions Local MockConfigFile format, so mock files users
//! already have work here: StateMachines → TestCases → state → mocked response; each response
//! maps invocation numbers ("0", "1-2") to `Return` or `Throw`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::Value as Json;

use super::error::StateError;
use super::Tasks;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MockConfig {
    pub state_machines: BTreeMap<String, MachineCases>,
    pub mocked_responses: BTreeMap<String, BTreeMap<String, MockedResponse>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct MachineCases {
    pub test_cases: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct MockedResponse {
    #[serde(rename = "Return")]
    pub ret: Option<Json>,
    pub throw: Option<Throw>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Throw {
    pub error: String,
    #[serde(default)]
    pub cause: String,
}

impl MockConfig {
    pub fn parse(text: &str) -> Result<MockConfig, String> {
        serde_json::from_str(text).map_err(|e| format!("invalid mock config: {e}"))
    }

    /// The test case `name`, from the machine `machine` or, when not given, the one machine that
    /// has such a test case.
    pub fn test_case(&self, machine: Option<&str>, name: &str) -> Result<MockTasks, String> {
        let candidates: Vec<(&String, &MachineCases)> = self
            .state_machines
            .iter()
            .filter(|(m, c)| {
                machine.is_none_or(|want| want == m.as_str()) && c.test_cases.contains_key(name)
            })
            .collect();
        let (_, cases) = match candidates.as_slice() {
            [one] => *one,
            [] => {
                return Err(format!(
                    "no state machine in the mock config has a test case `{name}`"
                ))
            }
            _ => {
                return Err(format!(
                "several state machines have a test case `{name}`; name one with --state-machine"
            ))
            }
        };
        let mut states = HashMap::new();
        for (state, response) in &cases.test_cases[name] {
            let ranges = self.mocked_responses.get(response).ok_or_else(|| {
                format!("test case `{name}` uses an undefined mocked response `{response}`")
            })?;
            let mut parsed = Vec::new();
            for (k, v) in ranges {
                let (a, b) = match k.split_once('-') {
                    Some((a, b)) => (a.trim().parse::<u32>(), b.trim().parse::<u32>()),
                    None => (k.trim().parse::<u32>(), k.trim().parse::<u32>()),
                };
                let (a, b) = a.ok().zip(b.ok()).ok_or_else(|| format!("mocked response `{response}`: `{k}` is not an invocation number or range like \"1-2\""))?;
                if v.ret.is_some() == v.throw.is_some() {
                    return Err(format!(
                        "mocked response `{response}` `{k}`: give exactly one of Return and Throw"
                    ));
                }
                parsed.push((a, b, v.clone()));
            }
            states.insert(state.clone(), parsed);
        }
        Ok(MockTasks {
            states,
            calls: Mutex::new(HashMap::new()),
        })
    }
}

/// Task results for one test case; counts invocations per state.
#[derive(Debug)]
pub struct MockTasks {
    states: HashMap<String, Vec<(u32, u32, MockedResponse)>>,
    calls: Mutex<HashMap<String, u32>>,
}

impl Tasks for MockTasks {
    fn invoke<'a>(
        &'a self,
        _resource: &'a str,
        state: &'a str,
        _input: Json,
    ) -> BoxFuture<'a, Result<Json, StateError>> {
        let n = {
            let mut calls = self
                .calls
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let c = calls.entry(state.to_string()).or_insert(0);
            *c += 1;
            *c - 1
        };
        let result = match self.states.get(state) {
            None => Err(StateError::new(
                "States.Runtime",
                format!("the test case has no mocked response for state `{state}`"),
            )),
            Some(ranges) => match ranges.iter().find(|(a, b, _)| (*a..=*b).contains(&n)) {
                None => Err(StateError::new(
                    "States.Runtime",
                    format!("state `{state}` has no mocked response for invocation {n}"),
                )),
                Some((_, _, MockedResponse { ret: Some(r), .. })) => Ok(r.clone()),
                Some((_, _, MockedResponse { throw: Some(t), .. })) => {
                    Err(StateError::new(t.error.clone(), t.cause.clone()))
                }
                Some(_) => Err(StateError::new("States.Runtime", "empty mocked response")),
            },
        };
        Box::pin(async move { result })
    }
}
