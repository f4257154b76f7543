// The custom allocation webhook with the official SDK (issue 19), called by
// interop.js when run.sh made the webhook's certificate (PROV_WEBHOOK_CERT,
// PROV_WEBHOOK_KEY; provisiond trusts its CA through custom_allocation.ca_file).
//
// A real HTTPS server in this process plays the Azure Function: it checks
// DPS's AllocationRequest, picks the second linked hub and returns an
// initialTwin and a payload. The device (ProvisioningDeviceClient + HTTP +
// SymmetricKeySecurityClient, unmodified) sends a payload with
// setProvisioningPayload and must get the webhook's payload back in
// registrationState.payload, on the hub the webhook chose.

'use strict';

const assert = require('assert');
const fs = require('fs');
const https = require('https');

/** Starts the webhook; resolves to {port, calls, close}. */
function startWebhook(pickHub) {
  const calls = [];
  const server = https.createServer({
    cert: fs.readFileSync(process.env.PROV_WEBHOOK_CERT),
    key: fs.readFileSync(process.env.PROV_WEBHOOK_KEY),
  }, (req, res) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => {
      let request = null;
      try { request = JSON.parse(body); } catch (e) { /* recorded as null */ }
      calls.push({ method: req.method, url: req.url, request });
      const ctx = (request && request.deviceRuntimeContext) || {};
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end(JSON.stringify({
        iotHubHostName: pickHub(request),
        initialTwin: { tags: { allocatedBy: 'webhook' }, properties: { desired: { rate: 5 } } },
        payload: { greeting: 'hello from the webhook', model: (ctx.payload || {}).model || null },
      }));
    });
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve({
      port: server.address().port,
      calls,
      // provisiond keeps its connection alive: drop it, or close() waits.
      close: () => new Promise((r) => {
        server.close(r);
        if (server.closeAllConnections) server.closeAllConnections();
        server.unref();
      }),
    }));
  });
}

/** h: { step, service, makeDeviceClient, newKey, assertAssigned, HUBS, RUN } */
async function run(h) {
  const { step, service, makeDeviceClient, newKey, assertAssigned, HUBS, RUN } = h;
  if (!process.env.PROV_WEBHOOK_CERT || HUBS.length < 2) {
    console.log('skip  custom allocation webhook (no webhook certificate or fewer than 2 hubs)');
    return;
  }
  const regId = `interop-webhook-${RUN}`;
  const key = newKey();
  const chosen = HUBS[1];
  const webhook = await startWebhook((request) => (request && request.linkedHubs || []).includes(chosen)
    ? chosen : 'not-offered.example.net');
  try {
    await step('custom allocation: the device gets the webhook\'s hub and payload', async () => {
      await service.createOrUpdateIndividualEnrollment({
        registrationId: regId,
        attestation: { type: 'symmetricKey', symmetricKey: { primaryKey: key, secondaryKey: newKey() } },
        allocationPolicy: 'custom',
        customAllocationDefinition: {
          webhookUrl: `https://localhost:${webhook.port}/api/allocate?code=function-key`,
          apiVersion: '2021-10-01',
        },
      });
      const device = makeDeviceClient(regId, key);
      device.setProvisioningPayload({ model: 'thermostat-7', firmware: '1.2.3' });
      const state = await device.register();
      assertAssigned(state, regId, regId, HUBS);
      assert.strictEqual(state.assignedHub, chosen, 'the webhook\'s hub');
      assert.deepStrictEqual(state.payload,
        { greeting: 'hello from the webhook', model: 'thermostat-7' },
        `registrationState.payload: ${JSON.stringify(state.payload)}`);

      // What the webhook got: DPS's AllocationRequest.
      assert.strictEqual(webhook.calls.length, 1, `webhook calls: ${webhook.calls.length}`);
      const call = webhook.calls[0];
      assert.strictEqual(call.method, 'POST');
      assert.strictEqual(call.url, '/api/allocate?code=function-key');
      const req = call.request;
      assert.ok(req && req.individualEnrollment, 'individualEnrollment in the request');
      assert.strictEqual(req.individualEnrollment.registrationId, regId);
      assert.strictEqual(req.individualEnrollment.attestation.symmetricKey.primaryKey, undefined,
        'keys must not reach the webhook');
      assert.strictEqual(req.deviceRuntimeContext.registrationId, regId);
      assert.deepStrictEqual(req.deviceRuntimeContext.payload,
        { model: 'thermostat-7', firmware: '1.2.3' });
      assert.deepStrictEqual(req.deviceRuntimeContext.symmetricKey, {});
      assert.deepStrictEqual([...req.linkedHubs].sort(), [...HUBS].sort());

      // The service's record keeps the payload too.
      const rs = (await service.getDeviceRegistrationState(regId)).responseBody;
      assert.strictEqual(rs.assignedHub, chosen);
      assert.deepStrictEqual(rs.payload, state.payload);
    });

    await step('custom allocation: clean up', async () => {
      await service.deleteDeviceRegistrationState(regId);
      await service.deleteIndividualEnrollment(regId);
    });
  } finally {
    await webhook.close();
  }
}

module.exports = { run };
