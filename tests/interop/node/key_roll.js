// Key rolling with the official SDK (issue 19), called by interop.js.
//
// The operator only edits the enrollment through ProvisioningServiceClient;
// the device (ProvisioningDeviceClient + HTTP + SymmetricKeySecurityClient)
// rolls primary -> secondary -> primary. Each replaced key is refused by the
// very next register (401), the device is never deleted or re-enrolled, and
// the service's registration record says which key the device used last
// (provisiond's symmetricKey.keyUsed). Once for an individual enrollment,
// once for a group (derived device keys).

'use strict';

const assert = require('assert');

/** Registers and expects the SDK to be refused with HTTP 401. */
async function expectRefused(makeDeviceClient, describe, regId, key) {
  let result;
  try {
    result = await makeDeviceClient(regId, key).register();
  } catch (err) {
    const status = err.response && err.response.statusCode;
    assert.strictEqual(status, 401, `expected HTTP 401, got ${describe(err)}`);
    const body = JSON.parse(err.responseBody);
    assert.strictEqual(body.errorCode, 401002, `errorCode ${body.errorCode}`);
    return;
  }
  assert.fail(`a replaced key still registered: ${JSON.stringify(result)}`);
}

async function keyUsed(service, regId) {
  const rs = (await service.getDeviceRegistrationState(regId)).responseBody;
  assert.strictEqual(rs.status, 'assigned', `registration of ${regId}`);
  return rs.symmetricKey && rs.symmetricKey.keyUsed;
}

/**
 * h: { step, service, makeDeviceClient, newKey, deriveKey, describe,
 *      assertAssigned, HUBS, RUN }
 */
async function run(h) {
  const { step, service, makeDeviceClient, newKey, deriveKey, describe, assertAssigned, HUBS, RUN } = h;
  const ids = { individual: `interop-roll-${RUN}`, group: `interop-roll-group-${RUN}`,
    member: `interop-roll-grp-${RUN}-a` };

  // Individual: P1/S1 -> P2/S1 -> P2/S2.
  const p1 = newKey(); const s1 = newKey(); const p2 = newKey(); const s2 = newKey();
  let hub;
  const rollIndividual = async (primaryKey, secondaryKey) => {
    const e = (await service.getIndividualEnrollment(ids.individual)).responseBody;
    e.attestation.symmetricKey = { primaryKey, secondaryKey };
    await service.createOrUpdateIndividualEnrollment(e);
  };

  await step('key roll: individual device registers with its primary key', async () => {
    await service.createOrUpdateIndividualEnrollment({
      registrationId: ids.individual,
      attestation: { type: 'symmetricKey', symmetricKey: { primaryKey: p1, secondaryKey: s1 } },
    });
    const state = await makeDeviceClient(ids.individual, p1).register();
    assertAssigned(state, ids.individual, ids.individual, HUBS);
    hub = state.assignedHub;
    assert.strictEqual(await keyUsed(service, ids.individual), 'primary');
  });

  await step('key roll: primary replaced -> old primary refused at once, secondary assigned', async () => {
    await rollIndividual(p2, s1);
    await expectRefused(makeDeviceClient, describe, ids.individual, p1);
    const state = await makeDeviceClient(ids.individual, s1).register();
    assertAssigned(state, ids.individual, ids.individual, HUBS);
    assert.strictEqual(state.assignedHub, hub, 'the key roll moved the device');
    assert.strictEqual(await keyUsed(service, ids.individual), 'secondary');
  });

  await step('key roll: secondary replaced -> old secondary refused, new primary assigned', async () => {
    await rollIndividual(p2, s2);
    await expectRefused(makeDeviceClient, describe, ids.individual, s1);
    const state = await makeDeviceClient(ids.individual, p2).register();
    assertAssigned(state, ids.individual, ids.individual, HUBS);
    assert.strictEqual(state.assignedHub, hub, 'the key roll moved the device');
    assert.strictEqual(await keyUsed(service, ids.individual), 'primary');
  });

  // Group: the device's key derives from the group's primary, then secondary.
  const g1 = newKey(); const h1 = newKey(); const g2 = newKey();
  await step('key roll: group device rolls from the derived primary to the derived secondary', async () => {
    await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: ids.group,
      attestation: { type: 'symmetricKey', symmetricKey: { primaryKey: g1, secondaryKey: h1 } },
    });
    let state = await makeDeviceClient(ids.member, deriveKey(g1, ids.member)).register();
    assertAssigned(state, ids.member, ids.member, HUBS);
    assert.strictEqual(await keyUsed(service, ids.member), 'primary');
    const g = (await service.getEnrollmentGroup(ids.group)).responseBody;
    g.attestation.symmetricKey = { primaryKey: g2, secondaryKey: h1 };
    await service.createOrUpdateEnrollmentGroup(g);
    await expectRefused(makeDeviceClient, describe, ids.member, deriveKey(g1, ids.member));
    state = await makeDeviceClient(ids.member, deriveKey(h1, ids.member)).register();
    assertAssigned(state, ids.member, ids.member, HUBS);
    assert.strictEqual(await keyUsed(service, ids.member), 'secondary');
    state = await makeDeviceClient(ids.member, deriveKey(g2, ids.member)).register();
    assertAssigned(state, ids.member, ids.member, HUBS);
    assert.strictEqual(await keyUsed(service, ids.member), 'primary');
  });

  await step('key roll: clean up', async () => {
    await service.deleteDeviceRegistrationState(ids.individual);
    await service.deleteDeviceRegistrationState(ids.member);
    await service.deleteIndividualEnrollment(ids.individual);
    await service.deleteEnrollmentGroup(ids.group);
  });
}

module.exports = { run };
