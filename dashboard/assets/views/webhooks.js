// PLACEHOLDER: to be written (issue 17).
import { h, mount, header } from '../lib/dom.js';

export default {
  id: 'webhooks',
  title: 'Webhooks',
  group: 'Integrations',
  render(ctx, el) {
    mount(el, header('Webhooks'), h('p', {}, 'Not built yet.'));
  },
};
