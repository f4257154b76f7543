// Interop test: the official Azure IoT Node SDK against provisiond.
//
// Service side: ProvisioningServiceClient (azure-iot-provisioning-service)
// creates an individual symmetric-key enrollment and a symmetric-key
// enrollment group. Device side: ProvisioningDeviceClient + the HTTP transport
// (azure-iot-provisioning-device-http) + SymmetricKeySecurityClient register
//   (a) the individual device,
//   (b) two devices of the group with keys derived from the group key,
//   (c) a device presenting the group key itself, which must be refused.
// Custom allocation (webhook.js): an HTTPS webhook in this process picks the
// hub and returns a payload the device gets in registrationState.payload.
// Key rolling (key_roll.js): the device rolls primary -> secondary -> primary
// while the service client only edits its enrollment or group.
// X.509 (azure-iot-security-x509's X509Security, certificates made with the
// openssl CLI): an individual enrollment with the device's self-signed
// certificate, and an enrollment group with a root CA whose device presents
// its leaf and intermediate in the TLS handshake.
//
// MQTT (azure-iot-provisioning-device-mqtt's Mqtt transport, unmodified): the
// same individual and group devices' kind registers over MQTT 3.1.1 over TLS,
// and the group key itself is refused at CONNECT. The MQTT transport dials
// 'mqtts://' + provisioningHost, and mqtt.js takes a port in that URL, so
// "127.0.0.1:<port>" as the host is all it needs (no port trick).
//
// MQTT over WebSocket (the same package's MqttWs transport, unmodified): an
// individual and a group device register through /$iothub/websocket on the
// HTTPS port, and the group key itself is refused. MqttWs dials
// 'wss://' + provisioningHost + ':443/$iothub/websocket' (the port is
// fixed); see THE WEBSOCKET PORT TRICK below.
//
// Environment (set by run.sh):
//   PROV_HOST              device API host the SDK dials (e.g. 127.0.0.1)
//   PROV_PORT              its port
//   PROV_MQTT_PORT         the MQTT listener's port ("" = MQTT steps skipped)
//   PROV_ID_SCOPE          the server's ID scope
//   PROV_CONNECTION_STRING service connection string (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...)
//   PROV_HUBS              optional comma-separated linked hub names the server knows
//   NODE_EXTRA_CA_CERTS    the server's CA (the SDKs have no CA option of their own)
//
// THE PORT TRICK. Both SDKs only ever dial port 443: the device HTTP transport
// hands `provisioningHost` to Node's https.request({host}) (a "host:port"
// string fails DNS), and the service client's RestApiClient does the same with
// the connection string's HostName. Neither exposes a port option. But both
// accept an injected lower layer:
//   - `new Http(httpBase)` (device transport) takes an azure-iot-http-base
//     `Http` object; RestApiClient calls `httpBase.buildRequest(method, path,
//     headers, host, [options,] done)`.
//   - `new ProvisioningServiceClient(config, restApiClient)` takes a
//     RestApiClient, whose third constructor argument is again such an `Http`.
// azure-iot-http-base's buildRequest already honours `options.port` when
// `options` looks like request options ({port: <number>}), it just never gets
// one. So we subclass the SDK's own Http class and pass {port} into every
// buildRequest call. Everything above the socket (paths, headers, SAS tokens,
// JSON handling, polling, retry-after) stays the unmodified SDK code, and
// nothing needs to bind 443. Each SDK is given a subclass of *its own* copy of
// azure-iot-http-base (npm may install different versions side by side).

'use strict';

const assert = require('assert');
const crypto = require('crypto');
const { execFileSync } = require('child_process');
const fs = require('fs');
const https = require('https');
const os = require('os');
const path = require('path');

const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http: DeviceHttpTransport } = require('azure-iot-provisioning-device-http');
const {
  Mqtt: DeviceMqttTransport, MqttWs: DeviceMqttWsTransport,
} = require('azure-iot-provisioning-device-mqtt');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { X509Security } = require('azure-iot-security-x509');
const { TpmSecurityClient } = require('azure-iot-security-tpm');
const tpmDevice = require('./tpm_device');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');

// ---- configuration --------------------------------------------------------

function env(name, fallback) {
  const v = process.env[name];
  if (v === undefined || v === '') {
    if (fallback !== undefined) return fallback;
    console.error(`interop: missing environment variable ${name}`);
    process.exit(2);
  }
  return v;
}

const HOST = env('PROV_HOST');
const PORT = Number(env('PROV_PORT'));
const MQTT_PORT = env('PROV_MQTT_PORT', '');
const ID_SCOPE = env('PROV_ID_SCOPE');
const CONNECTION_STRING = env('PROV_CONNECTION_STRING');
const HUBS = env('PROV_HUBS', '').split(',').map((s) => s.trim()).filter(Boolean);
const OVERALL_TIMEOUT_MS = Number(env('PROV_INTEROP_TIMEOUT_MS', '150000'));

// Unique ids per run so a reused data dir never collides.
const RUN = crypto.randomBytes(3).toString('hex');
const INDIVIDUAL_ID = `interop-dev-${RUN}`;
const INDIVIDUAL_DEVICE_ID = `interop-device-${RUN}`;
const GROUP_ID = `interop-group-${RUN}`;
const GROUP_DEVICES = [`interop-grp-${RUN}-a`, `interop-grp-${RUN}-b`];
const ROGUE_DEVICE = `interop-grp-${RUN}-rogue`;
const MQTT_INDIVIDUAL_ID = `interop-mqtt-${RUN}`;
const MQTT_GROUP_DEVICE = `interop-grp-${RUN}-mqtt`;
const MQTT_ROGUE_DEVICE = `interop-grp-${RUN}-mqtt-rogue`;
const WS_INDIVIDUAL_ID = `interop-ws-${RUN}`;
const WS_GROUP_DEVICE = `interop-grp-${RUN}-ws`;
const WS_ROGUE_DEVICE = `interop-grp-${RUN}-ws-rogue`;
const X509_INDIVIDUAL_ID = `interop-x509-${RUN}`;
const X509_GROUP_ID = `interop-x509-group-${RUN}`;
const X509_GROUP_DEVICE = `interop-x509-grp-${RUN}-a`;
const TPM_ID = `interop-tpm-${RUN}`;

// ---- the port trick (see the header comment) ----------------------------------

/** Loads a module as `fromPackage` sees it (its own nested copy if any). */
function requireFrom(fromPackage, moduleName) {
  const base = path.dirname(require.resolve(`${fromPackage}/package.json`));
  return require(require.resolve(moduleName, { paths: [base] }));
}

/** An azure-iot-http-base Http (from `HttpClass`) whose requests carry `port`. */
function portedHttpBase(HttpClass, port) {
  class PortedHttp extends HttpClass {
    buildRequest(method, reqPath, httpHeaders, host, options, done) {
      if (done === undefined && typeof options === 'function') {
        done = options;
        options = undefined;
      }
      if (options === undefined) {
        options = { port };
      } else if (this.isHttpRequestOptions(options)) {
        options = Object.assign({}, options, { port });
      } else if (this.isX509Options(options)) {
        // X.509 options cannot carry a port: request options whose request
        // function adds the device's certificate and key, as buildRequest
        // itself would.
        const x509 = options;
        options = {
          port,
          request: (opts, cb) => https.request(Object.assign({}, opts, {
            cert: x509.cert, key: x509.key, passphrase: x509.passphrase,
          }), cb),
        };
      } else {
        throw new Error('portedHttpBase: unexpected request options');
      }
      return super.buildRequest(method, reqPath, httpHeaders, host, options, done);
    }
  }
  return new PortedHttp();
}

function makeServiceClient() {
  const common = requireFrom('azure-iot-provisioning-service', 'azure-iot-common');
  const httpBase = requireFrom('azure-iot-provisioning-service', 'azure-iot-http-base');
  const servicePkg = require('azure-iot-provisioning-service/package.json');
  // Same config as ProvisioningServiceClient.fromConnectionString builds.
  const cn = common.ConnectionString.parse(CONNECTION_STRING);
  const config = {
    host: cn.HostName,
    sharedAccessSignature: common.SharedAccessSignature.create(
      cn.HostName, cn.SharedAccessKeyName, cn.SharedAccessKey, Date.now()),
    tokenCredential: undefined,
  };
  const rest = new httpBase.RestApiClient(
    config, `${servicePkg.name}/${servicePkg.version}`, portedHttpBase(httpBase.Http, PORT));
  return new ProvisioningServiceClient(config, rest);
}

function makeDeviceClient(registrationId, key) {
  const httpBase = requireFrom('azure-iot-provisioning-device-http', 'azure-iot-http-base');
  const transport = new DeviceHttpTransport(portedHttpBase(httpBase.Http, PORT));
  const security = new SymmetricKeySecurityClient(registrationId, key);
  return ProvisioningDeviceClient.create(HOST, ID_SCOPE, transport, security);
}

function makeMqttDeviceClient(registrationId, key) {
  const security = new SymmetricKeySecurityClient(registrationId, key);
  return ProvisioningDeviceClient.create(`${HOST}:${MQTT_PORT}`, ID_SCOPE,
    new DeviceMqttTransport(), security);
}

// THE WEBSOCKET PORT TRICK. MqttWs hands its URL (always port 443) to
// azure-iot-mqtt-base's MqttBase, which it takes as a constructor argument.
// MqttBase.setOptions({mqtt: {webSocketAgent}}) is the SDK's own option (for
// proxies): the agent reaches mqtt.js's wsOptions and so the `ws` library's
// HTTPS request. Our agent opens its TLS connection to the server's HTTPS
// port where the URL says 443; the upgrade request (path, subprotocol,
// key), the frames and every MQTT packet are the unmodified SDK's. Without
// the agent the SDK would dial 127.0.0.1:443 and fail, so a pass proves the
// device went through the WebSocket endpoint.
function makeMqttWsDeviceClient(registrationId, key) {
  const { MqttBase } = requireFrom('azure-iot-provisioning-device-mqtt', 'azure-iot-mqtt-base');
  class PortAgent extends https.Agent {
    createConnection(options, callback) {
      return super.createConnection(Object.assign({}, options, { port: PORT }), callback);
    }
  }
  const base = new MqttBase();
  base.setOptions({ mqtt: { webSocketAgent: new PortAgent() } });
  const security = new SymmetricKeySecurityClient(registrationId, key);
  return ProvisioningDeviceClient.create(HOST, ID_SCOPE, new DeviceMqttWsTransport(base),
    security);
}

function makeX509DeviceClient(registrationId, certPem, keyPem) {
  const httpBase = requireFrom('azure-iot-provisioning-device-http', 'azure-iot-http-base');
  const transport = new DeviceHttpTransport(portedHttpBase(httpBase.Http, PORT));
  const security = new X509Security(registrationId, { cert: certPem, key: keyPem });
  return ProvisioningDeviceClient.create(HOST, ID_SCOPE, transport, security);
}

// ---- certificates (openssl CLI) ---------------------------------------------------

const CERT_DIR = fs.mkdtempSync(path.join(os.tmpdir(), 'provisiond-interop-x509-'));
process.on('exit', () => fs.rmSync(CERT_DIR, { recursive: true, force: true }));

/** A P-256 certificate for `cn`: self-signed, or signed by `issuer`; {cert, key} PEM. */
function makeCert(name, cn, { ca = false, issuer } = {}) {
  const file = (ext) => path.join(CERT_DIR, `${name}.${ext}`);
  const ext = ca
    ? 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n'
    : 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n';
  fs.writeFileSync(file('ext'), ext);
  execFileSync('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256',
    '-nodes', '-keyout', file('key'), '-out', file('csr'), '-subj', `/O=provisiond interop/CN=${cn}`],
  { stdio: 'pipe' });
  const sign = issuer
    ? ['-CA', issuer.certFile, '-CAkey', issuer.keyFile, '-set_serial', String(Date.now())]
    : ['-signkey', file('key')];
  execFileSync('openssl', ['x509', '-req', '-in', file('csr'), '-days', '2', '-out', file('pem'),
    '-extfile', file('ext'), ...sign], { stdio: 'pipe' });
  return {
    cert: fs.readFileSync(file('pem'), 'utf8'), key: fs.readFileSync(file('key'), 'utf8'),
    certFile: file('pem'), keyFile: file('key'),
  };
}

// ---- helpers -------------------------------------------------------------------

/** registrationState.x509's X509CertificateInfo matches `pem` (read by Node's own X.509 parser). */
function assertCertificateInfo(info, pem) {
  const c = new crypto.X509Certificate(pem);
  const hex = (fp) => fp.replace(/:/g, '').toUpperCase();
  assert.ok(info, 'no X509CertificateInfo');
  assert.strictEqual(info.sha1Thumbprint, hex(c.fingerprint), JSON.stringify(info));
  assert.strictEqual(info.sha256Thumbprint, hex(c.fingerprint256), JSON.stringify(info));
  assert.strictEqual(info.serialNumber.replace(/^0+/, ''), c.serialNumber.replace(/^0+/, ''));
  assert.strictEqual(info.version, 3);
  assert.strictEqual(new Date(info.notAfterUtc).getTime(), new Date(c.validTo).getTime());
  assert.strictEqual(new Date(info.notBeforeUtc).getTime(), new Date(c.validFrom).getTime());
  const cn = /CN=([^\n]+)/.exec(c.subject)[1];
  assert.ok(info.subjectName.includes(`CN=${cn}`), `${info.subjectName} vs ${c.subject}`);
  assert.ok(typeof info.issuerName === 'string' && info.issuerName.length > 0);
}

const newKey = () => crypto.randomBytes(32).toString('base64');

/** The documented group derivation: base64(HMAC-SHA256(b64decode(groupKey), regId)). */
function deriveKey(groupKey, registrationId) {
  return crypto.createHmac('sha256', Buffer.from(groupKey, 'base64'))
    .update(registrationId, 'utf8').digest('base64');
}

/** Describes an SDK error with what the server sent. */
function describe(err) {
  if (!err) return String(err);
  const status = err.response && err.response.statusCode;
  const body = err.responseBody !== undefined ? err.responseBody
    : (err.result !== undefined ? JSON.stringify(err.result) : undefined);
  return `${err.name || 'Error'}: ${err.message}` +
    (status ? ` [HTTP ${status}]` : '') + (body ? ` body=${body}` : '');
}

let passed = 0;
let failed = 0;
async function step(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    passed++;
    console.log(`ok    ${name} (${Date.now() - t0} ms)`);
    return true;
  } catch (err) {
    failed++;
    console.log(`FAIL  ${name} (${Date.now() - t0} ms)\n      ${err instanceof assert.AssertionError ? err.message : describe(err)}`);
    return false;
  }
}

function assertAssigned(state, registrationId, expectedDeviceId, allowedHubs) {
  assert.ok(state && typeof state === 'object', `no registrationState for ${registrationId}`);
  assert.strictEqual(state.status, 'assigned', `status of ${registrationId}`);
  assert.strictEqual(state.registrationId, registrationId, 'registrationId echoed');
  assert.strictEqual(state.deviceId, expectedDeviceId, `deviceId of ${registrationId}`);
  assert.ok(typeof state.assignedHub === 'string' && state.assignedHub.length > 0,
    `assignedHub of ${registrationId} is empty`);
  if (allowedHubs.length > 0) {
    assert.ok(allowedHubs.includes(state.assignedHub),
      `assignedHub ${state.assignedHub} of ${registrationId} not in [${allowedHubs}]`);
  }
}

// ---- the test ------------------------------------------------------------------

async function main() {
  console.log(`interop: device API ${HOST}:${PORT}, scope ${ID_SCOPE}, hubs [${HUBS.join(', ')}]`);
  const service = makeServiceClient();
  const individualKeys = { primaryKey: newKey(), secondaryKey: newKey() };
  const groupKeys = { primaryKey: newKey(), secondaryKey: newKey() };
  const individualHubs = HUBS.length > 0 ? [HUBS[0]] : [];

  await step('service: create individual symmetric-key enrollment', async () => {
    const enrollment = {
      registrationId: INDIVIDUAL_ID,
      deviceId: INDIVIDUAL_DEVICE_ID,
      attestation: { type: 'symmetricKey', symmetricKey: individualKeys },
      provisioningStatus: 'enabled',
      initialTwin: { tags: { suite: 'interop' }, properties: { desired: { interval: 30 } } },
    };
    if (individualHubs.length > 0) {
      enrollment.iotHubs = individualHubs;
      enrollment.allocationPolicy = 'static';
    }
    const res = await service.createOrUpdateIndividualEnrollment(enrollment);
    const doc = res.responseBody;
    assert.strictEqual(doc.registrationId, INDIVIDUAL_ID);
    assert.strictEqual(doc.deviceId, INDIVIDUAL_DEVICE_ID);
    assert.strictEqual(doc.attestation.type, 'symmetricKey');
    assert.ok(doc.etag, 'enrollment has an etag');
  });

  await step('service: create symmetric-key enrollment group', async () => {
    const group = {
      enrollmentGroupId: GROUP_ID,
      attestation: { type: 'symmetricKey', symmetricKey: groupKeys },
      provisioningStatus: 'enabled',
    };
    if (HUBS.length > 0) {
      group.iotHubs = HUBS;
      group.allocationPolicy = 'hashed';
    }
    const res = await service.createOrUpdateEnrollmentGroup(group);
    assert.strictEqual(res.responseBody.enrollmentGroupId, GROUP_ID);
    assert.strictEqual(res.responseBody.attestation.type, 'symmetricKey');
  });

  await step('service: get enrollment and its attestation mechanism', async () => {
    const got = (await service.getIndividualEnrollment(INDIVIDUAL_ID)).responseBody;
    assert.strictEqual(got.registrationId, INDIVIDUAL_ID);
    const mech = (await service.getIndividualEnrollmentAttestationMechanism(INDIVIDUAL_ID)).responseBody;
    assert.strictEqual(mech.type, 'symmetricKey');
    assert.strictEqual(mech.symmetricKey.primaryKey, individualKeys.primaryKey);
    const gmech = (await service.getEnrollmentGroupAttestationMechanism(GROUP_ID)).responseBody;
    assert.strictEqual(gmech.symmetricKey.primaryKey, groupKeys.primaryKey);
  });

  await step('service: query lists the enrollment (paged)', async () => {
    const query = service.createIndividualEnrollmentQuery({ query: '*' }, 1);
    const ids = [];
    for (let pages = 0; query.hasMoreResults && pages < 1000; pages++) {
      const page = (await query.next()).responseBody;
      assert.ok(Array.isArray(page), 'query page is an array');
      for (const e of page) ids.push(e.registrationId);
    }
    assert.ok(!query.hasMoreResults, 'query terminates (x-ms-continuation omitted on the last page)');
    assert.ok(ids.includes(INDIVIDUAL_ID), `query results [${ids}] miss ${INDIVIDUAL_ID}`);
  });

  await step('device (a): individual enrollment registers over HTTP', async () => {
    const state = await makeDeviceClient(INDIVIDUAL_ID, individualKeys.primaryKey).register();
    assertAssigned(state, INDIVIDUAL_ID, INDIVIDUAL_DEVICE_ID, individualHubs);
  });

  for (const regId of GROUP_DEVICES) {
    await step(`device (b): group device ${regId} registers with its derived key`, async () => {
      const state = await makeDeviceClient(regId, deriveKey(groupKeys.primaryKey, regId)).register();
      assertAssigned(state, regId, regId, HUBS);
      if (state.symmetricKey && state.symmetricKey.enrollmentGroupId !== undefined) {
        assert.strictEqual(state.symmetricKey.enrollmentGroupId, GROUP_ID);
      }
    });
  }

  await step('device (c): the group key itself is refused (401)', async () => {
    let result;
    try {
      result = await makeDeviceClient(ROGUE_DEVICE, groupKeys.primaryKey).register();
    } catch (err) {
      const status = err.response && err.response.statusCode;
      assert.strictEqual(status, 401, `expected HTTP 401, got ${describe(err)}`);
      assert.strictEqual(err.name, 'UnauthorizedError', describe(err));
      const body = JSON.parse(err.responseBody);
      assert.strictEqual(Math.floor(body.errorCode / 1000), 401, `errorCode ${body.errorCode}`);
      return;
    }
    assert.fail(`registration with the group key succeeded: ${JSON.stringify(result)}`);
  });

  if (MQTT_PORT) {
    const mqttKeys = { primaryKey: newKey() };
    await step('service: create an individual enrollment for the MQTT device', async () => {
      await service.createOrUpdateIndividualEnrollment({
        registrationId: MQTT_INDIVIDUAL_ID,
        attestation: { type: 'symmetricKey', symmetricKey: mqttKeys },
      });
    });

    await step('device (g): individual enrollment registers over MQTT', async () => {
      const state = await makeMqttDeviceClient(MQTT_INDIVIDUAL_ID, mqttKeys.primaryKey).register();
      assertAssigned(state, MQTT_INDIVIDUAL_ID, MQTT_INDIVIDUAL_ID, HUBS);
    });

    await step(`device (h): group device ${MQTT_GROUP_DEVICE} registers over MQTT`, async () => {
      const state = await makeMqttDeviceClient(MQTT_GROUP_DEVICE,
        deriveKey(groupKeys.primaryKey, MQTT_GROUP_DEVICE)).register();
      assertAssigned(state, MQTT_GROUP_DEVICE, MQTT_GROUP_DEVICE, HUBS);
    });

    await step('device (i): the group key itself is refused over MQTT (CONNACK 5)', async () => {
      let result;
      try {
        result = await makeMqttDeviceClient(MQTT_ROGUE_DEVICE, groupKeys.primaryKey).register();
      } catch (err) {
        assert.ok(/not authorized/i.test(String(err && err.message)) ||
                  /not authorized/i.test(describe(err && err.transportError)),
          `expected a "Not authorized" refusal, got ${describe(err)}`);
        return;
      }
      assert.fail(`MQTT registration with the group key succeeded: ${JSON.stringify(result)}`);
    });

    await step('service: registration state of the MQTT device', async () => {
      const rs = (await service.getDeviceRegistrationState(MQTT_INDIVIDUAL_ID)).responseBody;
      assert.strictEqual(rs.registrationId, MQTT_INDIVIDUAL_ID);
      assert.strictEqual(rs.status, 'assigned');
    });
  } else {
    console.log('skip  MQTT steps: the server has no MQTT listener');
  }

  // MQTT over WebSocket on the HTTPS port (on by default, [mqtt] websocket).
  const wsKeys = { primaryKey: newKey() };
  await step('service: create an individual enrollment for the MqttWs device', async () => {
    await service.createOrUpdateIndividualEnrollment({
      registrationId: WS_INDIVIDUAL_ID,
      attestation: { type: 'symmetricKey', symmetricKey: wsKeys },
    });
  });

  await step('device (j): individual enrollment registers over MQTT over WebSocket', async () => {
    const state = await makeMqttWsDeviceClient(WS_INDIVIDUAL_ID, wsKeys.primaryKey).register();
    assertAssigned(state, WS_INDIVIDUAL_ID, WS_INDIVIDUAL_ID, HUBS);
  });

  await step(`device (k): group device ${WS_GROUP_DEVICE} registers over MQTT over WebSocket`,
    async () => {
      const state = await makeMqttWsDeviceClient(WS_GROUP_DEVICE,
        deriveKey(groupKeys.primaryKey, WS_GROUP_DEVICE)).register();
      assertAssigned(state, WS_GROUP_DEVICE, WS_GROUP_DEVICE, HUBS);
    });

  await step('device (l): the group key itself is refused over MQTT over WebSocket', async () => {
    let result;
    try {
      result = await makeMqttWsDeviceClient(WS_ROGUE_DEVICE, groupKeys.primaryKey).register();
    } catch (err) {
      assert.ok(/not authorized/i.test(String(err && err.message)) ||
                /not authorized/i.test(describe(err && err.transportError)),
        `expected a "Not authorized" refusal, got ${describe(err)}`);
      return;
    }
    assert.fail(`MqttWs registration with the group key succeeded: ${JSON.stringify(result)}`);
  });

  await step('service: registration state of the MqttWs device', async () => {
    const rs = (await service.getDeviceRegistrationState(WS_INDIVIDUAL_ID)).responseBody;
    assert.strictEqual(rs.registrationId, WS_INDIVIDUAL_ID);
    assert.strictEqual(rs.status, 'assigned');
  });

  // X.509: an individual enrollment naming the device's own certificate,
  // and a group whose root CA signs the device through an intermediate.
  const x509Device = makeCert('x509-dev', X509_INDIVIDUAL_ID);
  const root = makeCert('root', `interop root ${RUN}`, { ca: true });
  const inter = makeCert('inter', `interop intermediate ${RUN}`, { ca: true, issuer: root });
  const groupDevice = makeCert('x509-grp-dev', X509_GROUP_DEVICE, { issuer: inter });

  await step('service: create x509 individual enrollment and x509 enrollment group', async () => {
    const e = (await service.createOrUpdateIndividualEnrollment({
      registrationId: X509_INDIVIDUAL_ID,
      attestation: { type: 'x509', x509: { clientCertificates: { primary: { certificate: x509Device.cert } } } },
    })).responseBody;
    assert.strictEqual(e.attestation.type, 'x509');
    const info = e.attestation.x509.clientCertificates.primary.info;
    assert.ok(info && /^[0-9A-F]{64}$/.test(info.sha256Thumbprint), `info ${JSON.stringify(info)}`);
    const g = (await service.createOrUpdateEnrollmentGroup({
      enrollmentGroupId: X509_GROUP_ID,
      attestation: { type: 'x509', x509: { signingCertificates: { primary: { certificate: root.cert } } } },
    })).responseBody;
    assert.strictEqual(g.attestation.type, 'x509');
  });

  await step('device (d): x509 individual enrollment registers over HTTP', async () => {
    const state = await makeX509DeviceClient(X509_INDIVIDUAL_ID, x509Device.cert, x509Device.key).register();
    assertAssigned(state, X509_INDIVIDUAL_ID, X509_INDIVIDUAL_ID, HUBS);
    assert.ok(state.x509, `no x509 in ${JSON.stringify(state)}`);
    assertCertificateInfo(state.x509.certificateInfo, x509Device.cert);
    assert.strictEqual(state.x509.signingCertificateInfo, undefined);
  });

  await step('device (e): x509 group device (leaf + intermediate) registers over HTTP', async () => {
    const state = await makeX509DeviceClient(X509_GROUP_DEVICE, groupDevice.cert + inter.cert,
      groupDevice.key).register();
    assertAssigned(state, X509_GROUP_DEVICE, X509_GROUP_DEVICE, HUBS);
    assert.strictEqual(state.x509 && state.x509.enrollmentGroupId, X509_GROUP_ID);
    assertCertificateInfo(state.x509.certificateInfo, groupDevice.cert);
    assertCertificateInfo(state.x509.signingCertificateInfo, root.cert);
  });

  await step('device (f): x509 group device without its intermediate is refused (401)', async () => {
    let result;
    try {
      result = await makeX509DeviceClient(X509_GROUP_DEVICE, groupDevice.cert, groupDevice.key).register();
    } catch (err) {
      const status = err.response && err.response.statusCode;
      assert.strictEqual(status, 401, `expected HTTP 401, got ${describe(err)}`);
      const body = JSON.parse(err.responseBody);
      assert.strictEqual(body.errorCode, 401002, `errorCode ${body.errorCode}`);
      assert.ok(body.message.includes(`issued by 'CN=interop intermediate ${RUN}`), body.message);
      return;
    }
    assert.fail(`registration without the intermediate succeeded: ${JSON.stringify(result)}`);
  });

  if (!tpmDevice.haveSwtpm()) {
    console.log('SKIP  device (g): TPM -- swtpm is not installed (scripts/install-test-deps.sh); '
      + 'the TPM interop did NOT run');
  } else {
    await step('device (g): TPM device (swtpm via tss.js): challenge, activation, SAS, assigned', async () => {
      await tpmDevice.withSoftTpm(async (tpm) => {
        const security = new TpmSecurityClient(TPM_ID, tpm);
        const ek = await new Promise((resolve, reject) =>
          security.getEndorsementKey((err, key) => (err ? reject(err) : resolve(key))));
        const e = (await service.createOrUpdateIndividualEnrollment({
          registrationId: TPM_ID,
          attestation: { type: 'tpm', tpm: { endorsementKey: ek.toString('base64') } },
        })).responseBody;
        assert.strictEqual(e.attestation.type, 'tpm');
        const httpBase = requireFrom('azure-iot-provisioning-device-http', 'azure-iot-http-base');
        const transport = new DeviceHttpTransport(portedHttpBase(httpBase.Http, PORT));
        // The SDK answers the 401 challenge itself (ActivateCredential,
        // Import, HMAC) and, once assigned, activates the result's
        // tpm.authenticationKey: a bad blob fails register().
        // Unlike the other clients, the TPM registration hands back the whole
        // operation status (operationId, status, registrationState).
        const result = await ProvisioningDeviceClient.create(HOST, ID_SCOPE, transport, security).register();
        assert.strictEqual(result.status, 'assigned', JSON.stringify(result));
        const state = result.registrationState;
        assertAssigned(state, TPM_ID, TPM_ID, HUBS);
        assert.ok(state.tpm && typeof state.tpm.authenticationKey === 'string',
          `no tpm.authenticationKey in ${JSON.stringify(state)}`);
        // The hub side: the service SDK's attestation mechanism call carries
        // the device's IoT Hub key (tpm.iotHubKey, a provisiond extension),
        // and it verifies the IoT Hub SAS the TPM signs with the key the SDK
        // imported from tpm.authenticationKey.
        const mech = (await service.getIndividualEnrollmentAttestationMechanism(TPM_ID)).responseBody;
        assert.strictEqual(mech.type, 'tpm');
        assert.strictEqual(mech.tpm.endorsementKey, ek.toString('base64'));
        const hk = mech.tpm.iotHubKey;
        assert.ok(hk && typeof hk.primaryKey === 'string', `no tpm.iotHubKey in ${JSON.stringify(mech)}`);
        assert.strictEqual(hk.operationId, result.operationId);
        assert.strictEqual(hk.assignedHub, state.assignedHub);
        const toSign = `${encodeURIComponent(`${state.assignedHub}/devices/${state.deviceId}`)}\n`
          + `${Math.floor(Date.now() / 1000) + 3600}`;
        const tpmSig = await new Promise((resolve, reject) => security.signWithIdentity(
          Buffer.from(toSign), (err, sig) => (err ? reject(err) : resolve(sig))));
        const hubSig = crypto.createHmac('sha256', Buffer.from(hk.primaryKey, 'base64'))
          .update(toSign).digest('base64');
        assert.strictEqual(Buffer.from(tpmSig).toString('base64'), hubSig,
          'the hub key does not verify what the TPM signs');
      });
    });
  }

  await step('service: registration state of the individual device', async () => {
    const rs = (await service.getDeviceRegistrationState(INDIVIDUAL_ID)).responseBody;
    assert.strictEqual(rs.registrationId, INDIVIDUAL_ID);
    assert.strictEqual(rs.status, 'assigned');
    assert.strictEqual(rs.deviceId, INDIVIDUAL_DEVICE_ID);
  });

  // The custom allocation webhook (a local HTTPS server), in webhook.js.
  await require('./webhook').run({
    step, service, makeDeviceClient, newKey, assertAssigned, HUBS, RUN,
  });

  // Key rolling (primary -> secondary -> primary), in key_roll.js.
  await require('./key_roll').run({
    step, service, makeDeviceClient, newKey, deriveKey, describe, assertAssigned, HUBS, RUN,
  });

  await step('service: clean up enrollments and registrations', async () => {
    await service.deleteDeviceRegistrationState(INDIVIDUAL_ID);
    for (const regId of GROUP_DEVICES) await service.deleteDeviceRegistrationState(regId);
    await service.deleteIndividualEnrollment(INDIVIDUAL_ID);
    await service.deleteEnrollmentGroup(GROUP_ID);
    await service.deleteDeviceRegistrationState(X509_INDIVIDUAL_ID);
    await service.deleteDeviceRegistrationState(X509_GROUP_DEVICE);
    await service.deleteIndividualEnrollment(X509_INDIVIDUAL_ID);
    await service.deleteEnrollmentGroup(X509_GROUP_ID);
    if (tpmDevice.haveSwtpm()) {
      await service.deleteDeviceRegistrationState(TPM_ID);
      await service.deleteIndividualEnrollment(TPM_ID);
    }
    await service.deleteDeviceRegistrationState(WS_INDIVIDUAL_ID);
    await service.deleteDeviceRegistrationState(WS_GROUP_DEVICE);
    await service.deleteIndividualEnrollment(WS_INDIVIDUAL_ID);
    if (MQTT_PORT) {
      await service.deleteDeviceRegistrationState(MQTT_INDIVIDUAL_ID);
      await service.deleteDeviceRegistrationState(MQTT_GROUP_DEVICE);
      await service.deleteIndividualEnrollment(MQTT_INDIVIDUAL_ID);
    }
    let notFound = false;
    try {
      await service.getIndividualEnrollment(INDIVIDUAL_ID);
    } catch (err) {
      notFound = err.response && err.response.statusCode === 404;
      if (!notFound) throw err;
    }
    assert.ok(notFound, 'deleted enrollment is still readable');
  });
}

const watchdog = setTimeout(() => {
  console.log(`FAIL  interop did not finish within ${OVERALL_TIMEOUT_MS} ms`);
  console.log(`${passed} passed, ${failed + 1} failed`);
  process.exit(1);
}, OVERALL_TIMEOUT_MS);

main().then(() => {
  clearTimeout(watchdog);
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 ? 0 : 1);
}, (err) => {
  clearTimeout(watchdog);
  console.log(`FAIL  unexpected: ${describe(err)}\n${err && err.stack}`);
  console.log(`${passed} passed, ${failed + 1} failed`);
  process.exit(1);
});
