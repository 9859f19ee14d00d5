// The IAM decision for AWS requests, by @cloud-copilot/iam-simulate (npm): one JSON request per
// line on stdin, one JSON decision per line on stdout. Used by tests/rehearsal/moto_server.py,
// which turns each HTTP request moto receives into the IAM requests AWS would authorize.
//
// In:  {"principal": ARN, "action": "ec2:RunInstances", "resource": ARN, "accountId": "...",
//       "context": {...}, "identityPolicies": [{"name", "policy"}], "resourcePolicy": {...}?}
// Out: {"result": "Allowed" | "ExplicitlyDenied" | "ImplicitlyDenied" | "Error", "why": "..."}

const { createInterface } = require('node:readline');
// Found through NODE_PATH (the test tools' node_modules).
const { runSimulation } = require('@cloud-copilot/iam-simulate');

const lines = createInterface({ input: process.stdin, terminal: false });

async function decide(q) {
  const simulation = {
    identityPolicies: q.identityPolicies,
    serviceControlPolicies: [],
    resourceControlPolicies: [],
    resourcePolicy: q.resourcePolicy ?? undefined,
    request: {
      principal: q.principal,
      action: q.action,
      resource: { resource: q.resource, accountId: q.accountId },
      contextVariables: q.context ?? {},
    },
  };
  const r = await runSimulation(simulation, {});
  if (r.resultType === 'error') {
    return { result: 'Error', why: JSON.stringify(r.errors) };
  }
  return { result: r.overallResult, why: '' };
}

// Answers in order, one at a time: the caller waits for each answer before the next request.
let chain = Promise.resolve();
lines.on('line', (line) => {
  chain = chain.then(async () => {
    let answer;
    try {
      answer = await decide(JSON.parse(line));
    } catch (e) {
      answer = { result: 'Error', why: String(e && e.stack ? e.stack : e) };
    }
    process.stdout.write(JSON.stringify(answer) + '\n');
  });
});
